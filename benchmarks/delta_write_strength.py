"""The delta rule's write strength β = σ(W_β x + b_β) a converted checkpoint uses on held-out text.

    OMP_NUM_THREADS=1 python -m benchmarks.delta_write_strength runs/delta-keep6/model [more checkpoints]

For each checkpoint with ``linear: delta`` layers: β over the first ``--tokens`` tokens of the
held-out Wikipedia articles (never trained on), every token, kv head and converted layer: mean,
percentiles, and the lowest and highest per-layer mean. β starts at 0.5 everywhere (W_β = 0,
b_β = 0). Results: docs/recovery.md, "The delta rule against the additive branch".
"""

from __future__ import annotations

import argparse

import torch


def write_strengths(path: str, tokens: int) -> list[torch.Tensor]:
    """β [B, T, Hkv] of every delta layer of the checkpoint at ``path`` on ``tokens`` held-out tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from linearize.offline_text import wiki_articles

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    layers = [m for m in model.modules() if hasattr(m, "write_strength")]  # the exported DeltaAttention
    if not layers:
        raise SystemExit(f"{path}: no delta-rule layers (conversion.linear is not delta)")
    text = " ".join(article.text for article in wiki_articles("heldout"))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    betas: list[torch.Tensor] = []
    for layer in layers:
        strength = layer.write_strength
        layer.write_strength = lambda x, strength=strength: betas.append(strength(x).detach().float()) or betas[-1]
    with torch.no_grad():
        model(ids)
    return betas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="folders saved by linearize finetune (.../model)")
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()
    quantiles = torch.tensor([0.01, 0.1, 0.5, 0.9, 0.99])
    for path in args.checkpoints:
        betas = write_strengths(path, args.tokens)
        every = torch.cat([b.flatten() for b in betas])
        q = torch.quantile(every, quantiles).tolist()
        means = [b.mean().item() for b in betas]
        print(f"{path}: {len(betas)} delta layers, {every.numel()} values; beta mean {every.mean():.3f}; "
              f"percentiles 1/10/50/90/99: {' / '.join(f'{x:.3f}' for x in q)}; "
              f"per-layer mean {min(means):.3f} to {max(means):.3f}")


if __name__ == "__main__":
    main()
