"""The in-place single-token decode step (issue 19) against the general path it replaces.

``HybridAttention.decode_step`` (ring buffer, in-place state, a few fused ops) must give the same
logits and leave the same cache as ``hybrid_forward`` did for one-token steps, for every combination
of settings it covers (the grid of tests/test_combinations.py), with and without left padding, and
it must not allocate the cache per token.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_combinations import CACHE_KW, GRID, TEACHER, _id
from tiny_models import VOCAB

import linearize
from linearize import ConversionConfig
from linearize.cache import HybridCacheLayer, output_cache
from linearize.mixers import HybridAttention, iter_mixers

PROMPT, STEPS = 5, 6  # window 3 in the grid: the ring wraps twice


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(kwargs):
    torch.manual_seed(0)
    model = linearize.convert(copy.deepcopy(TEACHER), ConversionConfig(**kwargs))
    for _, param in linearize.conversion_parameters(model):  # away from the init, as after training
        param.data.add_(0.1 * torch.randn_like(param))
    return model


def _decode(model, ids, mask=None, steps=STEPS):
    """Prefill ``ids[:, :PROMPT]``, then one token at a time: per-step logits and the cache."""
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": mask[:, :PROMPT]}
        out = model(ids[:, :PROMPT], use_cache=True, **kw)
        cache, logits = output_cache(out), [out.logits]
        for t in range(PROMPT, PROMPT + steps):
            kw = {} if mask is None else {"attention_mask": mask[:, : t + 1]}
            out = model(ids[:, t : t + 1], use_cache=True, **{CACHE_KW: cache}, **kw)
            cache = output_cache(out)
            logits.append(out.logits)
    return torch.cat(logits, dim=1), cache


def _general_path(monkeypatch):
    monkeypatch.setattr(HybridAttention, "_decodes_in_place", lambda self, x: False)


def _window(layer: HybridCacheLayer):
    """The layer's window in time order (last <= window - 1 tokens), whichever form it holds."""
    if layer.ring is not None:
        layer = copy.copy(layer)
        layer._unring()
    return layer.keys, layer.values, layer.valid


# linear="none" (WindowOnlyAttention) keeps the general path: its rows would compare a path with itself
IN_PLACE = [c for c in GRID[:-1] if not c.get("sink_tokens") and not c.get("num_sinks")
            and c["linear_span"] == "all" and c["normalizer"] != "shared" and c.get("linear") != "none"]


def test_the_in_place_grid_is_not_empty():
    assert len(IN_PLACE) > 20 and {c["linear"] for c in IN_PLACE} >= {"gla"}


@pytest.mark.parametrize("padded", [False, True], ids=["plain", "left-padded"])
@pytest.mark.parametrize("kwargs", IN_PLACE, ids=[_id(c) for c in IN_PLACE])
def test_decode_step_equals_the_general_path_logits_and_cache(kwargs, padded, monkeypatch):
    model = _model(kwargs)
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, PROMPT + STEPS))
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[0, :2] = 0  # row 0 left-padded by two tokens
    calls = []
    original = HybridAttention.decode_step
    monkeypatch.setattr(HybridAttention, "decode_step", lambda self, *a: calls.append(1) or original(self, *a))
    fast, fast_cache = _decode(model, ids, mask)
    in_place = [m for _, m in iter_mixers(model) if m._in_place_config]
    assert in_place and len(calls) == STEPS * len(in_place)  # every step of those layers took the in-place path
    _general_path(monkeypatch)
    slow, slow_cache = _decode(model, ids, mask)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    for a, b in zip(fast_cache.layers, slow_cache.layers):
        assert a.seen_tokens == b.seen_tokens
        torch.testing.assert_close(a.state, b.state, atol=1e-5, rtol=1e-5)
        if kwargs["use_window"]:
            for x, y in zip(_window(a), _window(b)):
                torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


def test_nothing_of_the_cache_is_allocated_per_token():
    model = _model(dict(mixer="liger", window=3))
    ids = torch.randint(0, VOCAB, (1, PROMPT + 8))
    with torch.no_grad():
        cache = output_cache(model(ids[:, :PROMPT], use_cache=True))
        pointers = None
        for t in range(PROMPT, PROMPT + 8):
            model(ids[:, t : t + 1], use_cache=True, **{CACHE_KW: cache})
            now = [(layer.state.data_ptr(), *(x.data_ptr() for x in layer.ring)) for layer in cache.layers]
            assert pointers is None or now == pointers, f"step {t}: a cache tensor was reallocated"
            pointers = now


@pytest.mark.parametrize("mixer", ["liger", "lizard"])
def test_ring_then_several_tokens_then_ring_equals_one_forward(mixer):
    """Decode steps (ring), a call of several tokens (the window back in order), decode steps again."""
    kwargs = dict(mixer=mixer, window=4) if mixer == "liger" else dict(mixer=mixer, window=4, num_sinks=0)
    model = _model(kwargs)
    ids = torch.randint(0, VOCAB, (2, 20))
    splits = [3, 1, 1, 1, 1, 1, 5, 1, 1, 1, 2, 1, 1]  # 20 tokens
    with torch.no_grad():
        full = model(ids).logits
        cache, logits, at = None, [], 0
        for n in splits:
            kw = {} if cache is None else {CACHE_KW: cache}
            out = model(ids[:, at : at + n], use_cache=True, **kw)
            cache, at = output_cache(out), at + n
            logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), full, atol=1e-5, rtol=1e-5)


def test_greedy_generation_is_unchanged_by_the_in_place_step(monkeypatch):
    model = _model(dict(mixer="liger", window=3))
    ids = torch.randint(0, VOCAB, (2, 6))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    fast = model.generate(ids, **kw)
    _general_path(monkeypatch)
    slow = model.generate(ids, **kw)
    assert torch.equal(fast, slow)
