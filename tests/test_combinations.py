"""Every combination of settings ConversionConfig accepts runs: a forward, and prefill + decode equal
to it, on a tiny model (issue 17 item 12: e.g. hgrn2 with Hedgehog features used to fail), for both
linear branches (additive GLA and the delta rule, issue 18)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from transformers import LlamaModel

import linearize
from linearize import ConversionConfig
from linearize import kernels
from linearize.cache import cache_kwarg
from linearize.config import FEATURE_MAPS, GATES, LINEARS, MIXES
from linearize.kernels import chunked
from tiny_models import VOCAB, tiny_model

# (normalizer, linear_span, use_window): the branch layouts a config can ask for.
LAYOUTS = [("none", "all", True), ("separate", "all", True), ("shared", "all", True),
           ("shared", "beyond_window", True), ("none", "all", False), ("separate", "all", False)]


def _grid():
    cases = []
    for linear, mixer, gate, feature_map, layout in itertools.product(LINEARS, ("liger", "lizard"), GATES,
                                                                      FEATURE_MAPS, LAYOUTS):
        normalizer, span, use_window = layout
        kwargs = dict(linear=linear, mixer=mixer, gate=gate, feature_map=feature_map, normalizer=normalizer,
                      linear_span=span, use_window=use_window, window=3)
        # the settings outside the product take turns, so each value meets many of the others
        i = len(cases)
        kwargs["mix"] = MIXES[i % 2]
        kwargs["num_sinks"] = (i // 2) % 2 * 2 if use_window else 0
        kwargs["sink_tokens"] = (i // 4) % 2 if span == "beyond_window" else 0
        try:
            ConversionConfig(**kwargs)
        except ValueError:
            continue  # refused when made: nothing to run
        cases.append(kwargs)
    return cases + [dict(mixer="softmax")]


GRID = _grid()
# transformers renamed `past_key_values` to `cache` (5.2x); the GPU machine has 5.17.
CACHE_KW = cache_kwarg(LlamaModel)
TEACHER = tiny_model("llama")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only adds synchronisation
    yield
    torch.set_num_threads(before)


def _id(kw):
    return "-".join(str(v) for k, v in kw.items() if k != "window")


def test_the_grid_covers_every_gate_and_feature_map_of_both_mixers_and_linear_branches():
    seen = {(c["linear"], c["mixer"], c["gate"], c["feature_map"]) for c in GRID[:-1]}
    # liger has no learned gate
    assert len(seen) == len(LINEARS) * (2 * len(GATES) * len(FEATURE_MAPS) - len(FEATURE_MAPS))
    delta_layouts = {(c["normalizer"], c["linear_span"], c["use_window"]) for c in GRID[:-1] if c["linear"] == "delta"}
    assert delta_layouts == {layout for layout in LAYOUTS if layout[0] != "separate"}  # separate: refused


@pytest.mark.parametrize("kwargs", GRID, ids=[_id(c) for c in GRID])
def test_every_accepted_combination_runs_and_decodes(kwargs):
    torch.manual_seed(0)
    model = linearize.convert(copy.deepcopy(TEACHER), ConversionConfig(**kwargs))
    for _, param in linearize.conversion_parameters(model):  # away from the init, as after training
        param.data.add_(0.1 * torch.randn_like(param))
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        full = model(ids).logits
        assert torch.isfinite(full).all()
        out = model(ids[:, :4], use_cache=True)
        cache, steps = getattr(out, "cache", None) or out.past_key_values, [out.logits]
        for t in range(4, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], use_cache=True, **{CACHE_KW: cache}).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_conversion_chunk_size_reaches_the_chunked_kernel(monkeypatch):
    """ConversionConfig.chunk_size is the chunk length the converted layers' chunked GLA runs with."""
    seen = []

    def spy(*args, chunk_size=chunked.CHUNK_SIZE, **kwargs):
        seen.append(chunk_size)
        return chunked.gated_linear_attention(*args, chunk_size=chunk_size, **kwargs)

    monkeypatch.setattr(kernels, "chunked_gla", spy)
    ids = torch.randint(0, VOCAB, (1, 40))
    logits = {}
    for size in (8, 64):
        for mixer in ("liger", "lizard"):  # the fused op and the separate branches
            seen.clear()
            model = linearize.convert(copy.deepcopy(TEACHER), ConversionConfig(mixer=mixer, window=4, chunk_size=size))
            with torch.no_grad():
                logits[size, mixer] = model(ids).logits
            assert seen and set(seen) == {size}, (mixer, seen)
    for mixer in ("liger", "lizard"):  # a speed setting: the results agree to rounding
        torch.testing.assert_close(logits[8, mixer], logits[64, mixer], atol=1e-5, rtol=1e-5)
