"""The converted layer's cache: one update() per forward returns the window's history, the sink
tokens, the recurrent state and the delay line's output; the same tokens fed in any split give the
same views."""

from __future__ import annotations

import pytest
import torch

from linearize.cache import HybridCacheLayer, LinearInputs

B, HKV, D, F = 2, 2, 3, 4


def _tokens(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(B, T, HKV, D, generator=g), torch.randn(B, T, HKV, D, generator=g)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :3] = False  # a left-padded row
    linear = LinearInputs(torch.rand(B, T, HKV, F, generator=g), torch.randn(B, T, HKV, D + 1, generator=g),
                          -torch.rand(B, T, HKV, F, generator=g))
    return k, v, valid, linear


def _feed(layer, tokens, splits):
    """Feed the tokens in pieces; the views' per-token outputs joined, and the last view."""
    k, v, valid, linear = tokens
    outs, bounds = [], [0, *splits, k.shape[1]]
    for a, b in zip(bounds[:-1], bounds[1:]):
        view = layer.update(k[:, a:b], v[:, a:b], valid[:, a:b], linear=LinearInputs(*(x[:, a:b] for x in linear)))
        outs.append(view)
        layer.store_state(torch.zeros(B, HKV, F, D + 1))
    return outs


@pytest.mark.parametrize("splits", [[], [5], [1, 2, 3, 9]])
def test_window_history_and_delay_line_do_not_depend_on_the_split(splits):
    window, T = 4, 12
    tokens = _tokens(T)
    views = _feed(HybridCacheLayer(window, delay=True), tokens, splits)
    bounds = [0, *splits, T]
    for view, a, b in zip(views, bounds[:-1], bounds[1:]):
        start = max(0, a - (window - 1))
        torch.testing.assert_close(view.k, tokens[0][:, start:b], atol=0, rtol=0)  # history, then the new keys
        torch.testing.assert_close(view.valid, tokens[2][:, start:b], atol=0, rtol=0)
        assert view.past == a
        for got, x in zip(view.linear, tokens[3]):  # token t enters the state at t + window
            shifted = torch.cat([torch.zeros_like(x[:, :window]), x], dim=1)[:, a:b]
            torch.testing.assert_close(got, shifted, atol=0, rtol=0)
        assert (view.state is None) == (a == 0)


@pytest.mark.parametrize("splits", [[], [4], [1, 2, 3, 4, 5]])
def test_sink_tokens_are_each_rows_first_valid_tokens_and_leave_the_linear_state(splits):
    n, T = 2, 9
    k, v, valid, linear = tokens = _tokens(T)
    views = _feed(HybridCacheLayer(4, sink_tokens=n), tokens, splits)
    sinks = views[-1].sinks
    for row, first in ((0, [0, 1]), (1, [3, 4])):  # row 1 is padded for 3 tokens
        assert sinks.valid[row].all() and sinks.positions[row].tolist() == first
        torch.testing.assert_close(sinks.k[row], k[row, first], atol=0, rtol=0)
    keys = torch.cat([view.linear.k for view in views], dim=1)
    assert (keys[0, :2] == 0).all() and (keys[1, 3:5] == 0).all()  # sinks never enter the state
    torch.testing.assert_close(keys[0, 2:], linear.k[0, 2:], atol=0, rtol=0)
    torch.testing.assert_close(keys[1, 5:], linear.k[1, 5:], atol=0, rtol=0)


def test_memory_is_constant_and_reorder_reset_work():
    layer = HybridCacheLayer(4, delay=True, sink_tokens=1)
    _feed(layer, _tokens(6), [3])
    size = layer.nbytes()
    _feed(layer, _tokens(30, seed=1), [10, 20])
    assert layer.nbytes() == size and layer.get_seq_length() == 36
    layer.reorder_cache(torch.tensor([1, 0]))
    assert layer.keys.shape[0] == B and layer.sinks.k.shape[0] == B
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.nbytes() == 0


def test_transformers_cache_update_is_refused_with_a_clear_error():
    layer = HybridCacheLayer(4)
    with pytest.raises(RuntimeError, match="updated by its mixer"):
        layer.update(torch.zeros(1, 2, 1, 3), torch.zeros(1, 2, 1, 3), {"cache_position": None})


def test_cache_names_across_transformers_versions():
    """transformers 5.17 (the GPU machines) returns and takes ``past_key_values``; 5.2x ``cache``:
    the bench ran into ``'CausalLMOutputWithPast' object has no attribute 'cache'`` on the GPU."""
    from types import SimpleNamespace

    from linearize.cache import cache_kwarg, output_cache

    new, old = object(), object()
    assert output_cache(SimpleNamespace(cache=new, logits=None)) is new
    assert output_cache(SimpleNamespace(past_key_values=old, logits=None)) is old
    assert output_cache(SimpleNamespace(logits=None)) is None

    def forward_new(input_ids=None, cache=None, use_cache=None, **kwargs): ...
    def forward_old(input_ids=None, past_key_values=None, use_cache=None, **kwargs): ...

    assert cache_kwarg(SimpleNamespace(forward=forward_new)) == "cache"
    assert cache_kwarg(SimpleNamespace(forward=forward_old)) == "past_key_values"
