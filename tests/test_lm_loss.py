"""The chunked LM-head cross-entropy / KL equals the plain full-logits computation: values and
gradients with respect to the hidden states and the LM-head weight (fp32), ragged lengths, ignored labels."""

import pytest
import torch
import torch.nn.functional as F

from linearize.train.lm_loss import (
    IGNORE_INDEX,
    NO_LOGITS,
    capture_lm_head_input,
    chunked_lm_loss,
    chunked_nll_sums,
    shifted_labels,
)

FP32_TOL = dict(rtol=1e-5, atol=1e-6)


def _inputs(b, t, d=16, v=97, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, t, d, generator=g, requires_grad=True)  # [b, T, d]
    w = (torch.randn(v, d, generator=g) * 0.5).requires_grad_(True)  # [V, d]
    labels = torch.randint(0, v, (b, t), generator=g)
    if ignore:
        labels[torch.rand(b, t, generator=g) < 0.3] = IGNORE_INDEX
        labels[:, -1] = IGNORE_INDEX
    th = torch.randn(b, t, d, generator=g)
    return h, w, labels, th


def _full(h, w, labels, th, temperature):
    logits = F.linear(h, w).float().flatten(0, 1)  # [N, V]
    ce = F.cross_entropy(logits, labels.flatten(), ignore_index=IGNORE_INDEX)
    if th is None:
        return ce, None
    t_logits = F.linear(th, w.detach()).float().flatten(0, 1)  # the teacher is a constant
    kl = F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(t_logits / temperature, -1),
                  log_target=True, reduction="batchmean") * temperature ** 2
    return ce, kl


@pytest.mark.parametrize("b,t,chunk", [(1, 37, 8), (2, 13, 5), (3, 7, 64), (1, 1, 4)])
@pytest.mark.parametrize("with_kl", [False, True])
def test_chunked_equals_full_values_and_gradients(b, t, chunk, with_kl):
    h, w, labels, th = _inputs(b, t, ignore=t > 1)
    if t == 1:
        labels[:] = 3
    temperature = 2.0
    th = th if with_kl else None
    ce_ref, kl_ref = _full(h, w, labels, th, temperature)
    loss_ref = ce_ref + (0.7 * kl_ref if with_kl else 0)
    gh_ref, gw_ref = torch.autograd.grad(loss_ref, (h, w))

    ce, kl = chunked_lm_loss(h, w, labels, th, temperature=temperature, chunk=chunk)
    loss = ce + (0.7 * kl if with_kl else 0)
    gh, gw = torch.autograd.grad(loss, (h, w))
    torch.testing.assert_close(ce, ce_ref, **FP32_TOL)
    if with_kl:
        torch.testing.assert_close(kl, kl_ref, **FP32_TOL)
    else:
        assert kl is None
    torch.testing.assert_close(gh, gh_ref, **FP32_TOL)
    torch.testing.assert_close(gw, gw_ref, **FP32_TOL)


def test_separate_gradients_of_ce_and_kl():
    """Each output carries its own gradient (the backward scales them independently)."""
    h, w, labels, th = _inputs(2, 11)
    ce_ref, kl_ref = _full(h, w, labels, th, 1.0)
    ce, kl = chunked_lm_loss(h, w, labels, th, chunk=4)
    for a, b_ in ((kl_ref, kl), (3 * ce_ref - 2 * kl_ref, 3 * ce - 2 * kl)):
        ref = torch.autograd.grad(a, (h, w), retain_graph=True)
        got = torch.autograd.grad(b_, (h, w), retain_graph=True)
        for x, y in zip(got, ref):
            torch.testing.assert_close(x, y, **FP32_TOL)


def test_frozen_weight_and_no_grad():
    h, w, labels, _ = _inputs(1, 9)
    w = w.detach()
    ce_ref, _ = _full(h, w, labels, None, 1.0)
    ce, _ = chunked_lm_loss(h, w, labels, chunk=4)
    torch.testing.assert_close(torch.autograd.grad(ce, h)[0], torch.autograd.grad(ce_ref, h)[0], **FP32_TOL)
    with torch.no_grad():
        ce2, _ = chunked_lm_loss(h, w, labels, chunk=2)
    torch.testing.assert_close(ce2, ce_ref.detach(), **FP32_TOL)


def test_matches_hf_causal_lm_loss_with_shifted_labels():
    """The decoder's output captured while the LM head scores no position, shifted_labels and the
    chunked CE give the loss a causal LM returns for labels=ids."""
    from tests.tiny_models import tiny_model

    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))
    ref = model(input_ids=ids, labels=ids).loss
    with capture_lm_head_input(model) as box:
        out = model(input_ids=ids, logits_to_keep=NO_LOGITS)
    assert out.logits.shape[1] == 0
    ce, _ = chunked_lm_loss(box["hidden"], model.lm_head.weight, shifted_labels(ids), chunk=7)
    torch.testing.assert_close(ce, ref, **FP32_TOL)


def test_bad_chunk():
    h, w, labels, _ = _inputs(1, 3)
    with pytest.raises(ValueError, match="chunk=0"):
        chunked_lm_loss(h, w, labels, chunk=0)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kl_weight", ["0", "0.5"])
def test_tiny_finetune_same_losses_with_and_without_chunking(tmp_path, kl_weight):
    """The LoRA stage's CE / KL / loss per step and the held-out perplexities are the same (fp32
    rounding) with the chunked LM-head loss (chunk 5: ragged against 4 x 16 positions) and without."""
    from tiny_models import tiny_recipe, tiny_teacher
    from tiny_tokenizer import byte_tokenizer

    from linearize.train import finetune

    def lora_history(out, chunk):
        recipe = tiny_recipe(tmp_path, out, f"lora.kl_weight={kl_weight}", f"lora.lm_loss_chunk={chunk}")
        summary = finetune(recipe, model=tiny_teacher(), tokenizer=byte_tokenizer()).summary
        return summary["stages"]["lora"]["history"], summary["perplexity"]

    (full, ppl_full), (chunked, ppl_chunked) = lora_history("full", 0), lora_history("chunked", 5)
    assert set(full) == set(chunked) and ("kl" in full) == (kl_weight != "0")
    for key in full:
        assert len(full[key]) == 4
        torch.testing.assert_close(torch.tensor(chunked[key]), torch.tensor(full[key]), rtol=2e-5, atol=1e-6)
    assert full["loss"][-1] < full["loss"][0]  # it trained: the comparison is not between constants
    for key in ppl_full:
        assert ppl_chunked[key] == pytest.approx(ppl_full[key], rel=1e-5)


def test_chunked_nll_sums_equal_full_row_sums():
    h, w, labels, _ = _inputs(3, 37, ignore=True)
    h = h.detach().view(3, 37, -1)
    labels = labels.view(3, 37)
    logits = F.linear(h, w.detach()).float()  # [3, 37, V]
    full = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none").sum(1)
    for chunk in (1, 8, 37, 100):
        torch.testing.assert_close(chunked_nll_sums(h, w.detach(), labels, chunk), full, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="chunk=0"):
        chunked_nll_sums(h, w, labels, 0)


@pytest.mark.parametrize("wrap", ["plain", "peft"])
def test_held_out_nll_scores_from_hidden_states_as_the_full_logits_do(monkeypatch, wrap):
    """The held-out loss never asks the model for logits (the LM head runs on 0 positions) and equals
    the full-logits path; ragged last batch, PEFT-wrapped or not."""
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model
    from tiny_models import tiny_model

    from linearize.train import metrics

    model = tiny_model("llama")
    if wrap == "peft":
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    acc = Accelerator(cpu=True)
    blocks = torch.randint(0, model.config.vocab_size, (5, 24), generator=torch.Generator().manual_seed(0))
    head = (model.get_base_model() if wrap == "peft" else model).get_output_embeddings()
    positions = []
    handle = head.register_forward_hook(lambda m, a, out: positions.append(out.shape[1]))
    chunked = metrics.held_out_nll(model, blocks, acc, batch_size=2)
    assert positions == [0, 0, 0]  # 3 batches (2 + 2 + 1 rows), no logits
    monkeypatch.setattr(metrics, "_causal_lm", lambda model, accelerator: None)
    full = metrics.held_out_nll(model, blocks, acc, batch_size=2)
    handle.remove()
    assert positions[3:] == [24, 24, 24]
    assert chunked == pytest.approx(full, rel=1e-6)
    assert metrics.held_out_nll(model, blocks, acc, batch_size=2, max_batches=1) != pytest.approx(full, rel=1e-6)
