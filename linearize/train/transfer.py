"""Stage 1, attention transfer: train only what the conversion added to match the teacher.

Per batch, one teacher pass (under ``teacher_attention``) records every converted layer's attention
input and output with forward hooks; each mixer's hybrid forward then runs on those inputs, and the
loss is the sum of the per-layer MSEs (layers are independent). The parameters are tiny, so the
model is not wrapped for data parallelism: the gradients are averaged across processes by hand.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

from ..convert import conversion_parameters
from ..mixers import iter_mixers, teacher_attention
from .loop import Run
from .metrics import eval_batches
from .optim import optimizer_and_scheduler
from .state import TRANSFER_STATE_FILE

# Keyword arguments of an attention call that belong to the cache, dropped when a mixer is re-run.
_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "use_cache")


def decoder(model: nn.Module) -> nn.Module:
    """The model without its LM head (``model.model`` for Llama-style causal LMs)."""
    return getattr(model, model.base_model_prefix, model)


class _LayerCapture:
    """Forward hooks recording each mixer's call (args, kwargs) and output during a teacher pass."""

    def __init__(self, mixers: list[tuple[int, nn.Module]]):
        self.mixers = mixers
        self.records: dict[int, tuple[tuple, dict, torch.Tensor]] = {}
        self.handles: list = []

    def _hook(self, layer: int, module, args, kwargs, output):
        out = output[0] if isinstance(output, tuple) else output
        kwargs = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}
        self.records[layer] = (args, kwargs, out)

    def __enter__(self):
        self.records.clear()
        self.handles = [m.register_forward_hook(partial(self._hook, i), with_kwargs=True) for i, m in self.mixers]
        return self.records

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        return False


def transfer_errors(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer attention-transfer error of one batch.

    Returns (mse [L, B], teacher power [L, B]): per converted layer and row, the mean squared error
    between the hybrid's and the teacher's attention outputs on the teacher's hidden states, and the
    teacher output's mean square (to make the error relative). Gradients flow into the hybrid.
    """
    mixers = list(iter_mixers(model))
    capture = _LayerCapture(mixers)
    with torch.no_grad(), teacher_attention(model), capture as records:
        decoder(model)(input_ids=input_ids, use_cache=False)
    mse, power = [], []
    for i, mixer in mixers:
        args, kwargs, target = records[i]
        out = mixer(*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out  # [B, T, hidden]
        target = target.float()
        mse.append((out.float() - target).pow(2).mean(dim=(1, 2)))  # [B]
        power.append(target.pow(2).mean(dim=(1, 2)))  # [B]
    return torch.stack(mse), torch.stack(power)  # [L, B], [L, B]


@torch.no_grad()
def layer_errors(model, blocks, accelerator, batch_size, max_batches, autocast) -> dict[str, list[float]]:
    """Per converted layer: mean transfer MSE and MSE relative to the teacher output's power."""
    layers = [i for i, _ in iter_mixers(model)]
    sums = torch.zeros(3, len(layers), dtype=torch.float64, device=accelerator.device)  # mse, power, rows
    for ids, w in eval_batches(blocks, accelerator, batch_size, max_batches):
        with autocast():
            mse, power = transfer_errors(model, ids)
        sums[0] += (mse.double() * w).sum(1)
        sums[1] += (power.double() * w).sum(1)
        sums[2] += w.sum()
    sums = accelerator.reduce(sums, "sum")
    mse, power = sums[0] / sums[2], sums[1] / sums[2]
    return {"layers": layers, "mse": mse.tolist(), "relative_mse": (mse / power.clamp_min(1e-30)).tolist()}


def load_transfer_params(model: nn.Module, path: Path, device) -> None:
    """Put a checkpoint's trained conversion parameters into ``model``."""
    saved = torch.load(path, map_location=device, weights_only=True)["params"]
    named = dict(conversion_parameters(model))
    missing = sorted(set(named) - set(saved))
    if missing:
        raise ValueError(f"checkpoint {path} lacks conversion parameters {missing[:3]}...: was the recipe changed?")
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(saved[name])


class AttentionTransfer:
    """The attention-transfer :class:`~linearize.train.loop.Stage`."""

    name = "attention_transfer"

    def __init__(self, run: Run, model: nn.Module, resume_dir: Path | None):
        self.run, self.model = run, model
        self.acc, self.tc = run.acc, run.recipe.train
        self.st = run.state.stages[self.name]
        self.named = list(conversion_parameters(model))
        for p in model.parameters():
            p.requires_grad_(False)
        self.params = [p for _, p in self.named]
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer, self.scheduler = optimizer_and_scheduler(self.params, run.recipe.attention_transfer,
                                                                 self.st.total_steps)
        if resume_dir is not None:
            saved = torch.load(resume_dir / TRANSFER_STATE_FILE, map_location=self.acc.device, weights_only=True)
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
        model.train()
        # fp16 without a loss scaler is unsafe; the trained parameters are tiny, so fp16 recipes run
        # this stage in fp32.
        self.autocast = partial(run.autocast, allow_fp16=False)
        if "per_layer_before" not in self.st.results:
            self.st.results["per_layer_before"] = self.errors()

    def errors(self) -> dict[str, list[float]]:
        return layer_errors(self.model, self.run.eval_blocks(), self.acc, self.run.per_device_batch,
                            self.tc.eval_batches, self.autocast)

    def micro_step(self, ids: torch.Tensor, sync: bool) -> dict[str, torch.Tensor]:
        with self.autocast():
            mse, _ = transfer_errors(self.model, ids)
        loss = mse.mean(dim=1).sum()  # sum over layers of each layer's MSE
        if not loss.requires_grad:
            raise ValueError(
                "attention transfer has nothing to train: no conversion parameter changes the converted layers' "
                "outputs (e.g. conversion.linear=none without learned sinks, or conversion.mixer=softmax); "
                "drop the stage: stages=[lora]"
            )
        (loss / self.tc.grad_accum).backward()
        return {"loss": loss}

    def optimizer_step(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self.acc.num_processes > 1:
            flat = self.acc.reduce(torch.cat([g.flatten() for g in grads]), "mean")
            for p, g in zip(self.params, flat.split([g.numel() for g in grads])):
                p.grad = g.view_as(p).clone()
        if self.tc.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.tc.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, folder: Path) -> None:
        if self.acc.is_main_process:
            torch.save({
                "params": {n: p.detach().cpu() for n, p in self.named},
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
            }, folder / TRANSFER_STATE_FILE)

    def evaluate(self) -> dict[str, float]:
        return {"val_transfer_mse": sum(self.errors()["mse"])}

    def finish(self) -> None:
        self.st.results["per_layer_after"] = self.errors()

    def close(self) -> None:
        """Log the per-layer result, freeze the parameters again."""
        after = self.st.results["per_layer_after"]
        worst = sorted(zip(after["relative_mse"], after["layers"]), reverse=True)[:4]
        self.run.log.info("attention transfer: relative MSE per layer %s; highest in layers %s (candidates for "
                          "conversion.keep_softmax_layers)",
                          " ".join(f"{e:.3g}" for e in after["relative_mse"]), [layer for _, layer in worst])
        for p in self.params:
            p.requires_grad_(False)
        self.model.eval()


__all__ = ["AttentionTransfer", "decoder", "layer_errors", "load_transfer_params", "transfer_errors"]
