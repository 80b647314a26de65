"""Eval scoring through the LM head on the scored positions only (linearize.evals.scoring) gives
lm-eval's plain HFLM numbers on the same loglikelihood and loglikelihood_rolling requests."""

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from tiny_models import tiny_teacher  # noqa: E402
from tiny_tokenizer import byte_tokenizer  # noqa: E402

from linearize.evals.runner import make_lm  # noqa: E402
from linearize.evals.scoring import SlicedScoring  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. " * 3


def _requests():
    ll = [("the quick brown", " fox"), ("a", " b c d e f g"), (TEXT[:150], " over the lazy dog"),
          (TEXT[:40], TEXT[40:90])]  # the last ones are truncated from the left at max_length 64
    loglik = [Instance("loglikelihood", {}, args, i) for i, args in enumerate(ll)]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate([TEXT, TEXT[:30], "x"])]
    return loglik, rolling


@pytest.mark.parametrize("batch_size,chunk", [(1, 512), (3, 5)])
def test_sliced_scoring_equals_hflm(batch_size, chunk):
    import linearize

    from linearize.config import ConversionConfig

    model = linearize.convert(tiny_teacher(max_positions=128), ConversionConfig(mixer="lizard", window=4)).eval()
    tok = byte_tokenizer()
    plain = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, max_length=64)
    sliced = make_lm(model, tok, batch_size=batch_size, max_length=64)
    assert isinstance(sliced, SlicedScoring)
    sliced.score_chunk = chunk
    calls = []
    sliced._model_call = lambda *a, **k: calls.append(a)  # the full-logits path is never taken
    loglik, rolling = _requests()
    want, got = plain.loglikelihood(loglik), sliced.loglikelihood(loglik)
    assert [g for _, g in got] == [g for _, g in want]
    torch.testing.assert_close(torch.tensor([v for v, _ in got]), torch.tensor([v for v, _ in want]),
                               rtol=1e-5, atol=1e-5)
    want_r, got_r = plain.loglikelihood_rolling(rolling), sliced.loglikelihood_rolling(rolling)
    torch.testing.assert_close(torch.tensor(got_r), torch.tensor(want_r), rtol=1e-5, atol=1e-5)
    assert not calls


def test_heads_it_cannot_reproduce_fall_back_to_hflm():
    model = tiny_teacher()
    model.config.final_logit_softcapping = 30.0  # logits are not lm_head(hidden): HFLM's own path
    lm = make_lm(model, byte_tokenizer(), batch_size=2, max_length=64)
    calls = []
    original = lm._model_call
    lm._model_call = lambda *a, **k: calls.append(1) or original(*a, **k)
    lm.loglikelihood(_requests()[0][:1])
    assert calls
