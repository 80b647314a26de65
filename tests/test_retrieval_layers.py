"""The retrieval-layer probes on a tiny teacher: streaming attention equals full attention when the
window covers the sequence and changes it when it does not, it is undone on exit, the scores are
attention probabilities, and the suggestion takes the far-attention and induction leaders."""

from __future__ import annotations

import pytest
import torch
from oracles import streaming_allowed, streaming_attention
from tiny_models import VOCAB, tiny_model

from benchmarks import retrieval_layers as rl


@pytest.fixture
def model():
    return tiny_model("llama")


def test_streaming_attention_is_exact_with_a_covering_window_and_undone_on_exit(model):
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        with rl.streaming_attention(model, keep=[], window=24, sinks=0):
            covering = model(ids).logits
        with rl.streaming_attention(model, keep=[], window=4, sinks=2):
            narrow = model(ids).logits
        with rl.streaming_attention(model, keep=[0, 1], window=4, sinks=2):
            all_kept = model(ids).logits
        after = model(ids).logits
    torch.testing.assert_close(covering, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(all_kept, full, rtol=0, atol=0)
    torch.testing.assert_close(after, full, rtol=0, atol=0)
    # the first window + sinks positions see everything either way; later ones lose context
    torch.testing.assert_close(narrow[:, :4], full[:, :4], rtol=1e-5, atol=1e-5)
    assert (narrow[:, 8:] - full[:, 8:]).abs().max() > 1e-3


def test_streaming_attention_matches_the_tests_oracle(model):
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with rl.streaming_attention(model, keep=[1], window=4, sinks=3):
            probe = model(ids).logits
        with streaming_attention(model, keep=[1], window=4, sinks=3):
            oracle = model(ids).logits
    torch.testing.assert_close(probe, oracle, rtol=0, atol=0)
    for T, window, sinks in ((8, 3, 1), (12, 5, 0), (6, 8, 2)):
        assert torch.equal(rl.streaming_mask(T, window, sinks, dtype=torch.float32)[0, 0] == 0,
                           streaming_allowed(T, window, sinks))


def test_streaming_mask_allows_window_and_sinks_only():
    mask = rl.streaming_mask(8, window=3, sinks=1, dtype=torch.float32)[0, 0] == 0
    assert mask[7].tolist() == [True, False, False, False, False, True, True, True]
    assert mask[2].tolist() == [True, True, True, False, False, False, False, False]


def test_scores_are_attention_mass(model):
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    ind = rl.induction_scores(model, length=16, batch=2, vocab=(0, VOCAB))
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(1))
    far = rl.far_attention(model, ids, window=8, sinks=2)
    for scores in (ind, far):
        assert scores.shape == (layers, heads)
        assert (scores >= 0).all() and (scores <= 1).all()
    # a random model spreads attention: most of it lies beyond an 8-token window at 40 tokens
    assert far.mean() > 0.3
    assert model.config._attn_implementation == "sdpa"  # restored after the eager probes
    with pytest.raises(ValueError, match="more than window"):
        rl.far_attention(model, ids[:, :9], window=8, sinks=2)


def test_suggest_takes_far_leader_then_induction_leaders():
    induction = torch.tensor([[0.0, 0.1], [0.9, 0.0], [0.2, 0.3], [0.0, 0.8], [0.5, 0.0]])
    far = torch.tensor([[0.9, 0.0], [0.1, 0.1], [0.0, 0.2], [0.3, 0.0], [0.1, 0.0]])
    assert rl.suggest_layers(induction, far, count=3) == [0, 1, 3]
    assert rl.suggest_layers(induction, far, count=3, far_count=0) == [1, 3, 4]
    with pytest.raises(ValueError, match="count"):
        rl.suggest_layers(induction, far, count=6)
