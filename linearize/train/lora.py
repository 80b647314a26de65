"""Stage 2, LoRA: peft adapters on the reused projections, next-token cross-entropy (+ optional KL
to the teacher's logits: the same model with adapters disabled under ``teacher_attention``), on the
``accelerator.prepare``-d model (DDP or FSDP). Then: save the adapter, merge it."""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from safetensors.torch import save_file
from torch import nn

from ..convert import conversion_parameters
from ..mixers import teacher_attention
from ..outputs import atomic_folder, write_marker, written_by_linearize
from ..recipe import LoraConfig, Recipe
from .lm_loss import (
    NO_LOGITS,
    capture_lm_head_input,
    chunked_lm_loss,
    lm_head_weight,
    shifted_labels,
)
from .loop import Run, quiet_accelerate
from .memory import light_mlps, trimmed_forward
from .metrics import held_out_nll
from .optim import optimizer_and_scheduler
from .state import CONVERSION_PARAMS_FILE

LIGHT_MLP = True
"""The LoRA step's gated MLPs keep ``gate`` and ``up`` for the backward and recompute the activation
there (``linearize.train.memory.light_mlps``: the same gradients, a third less of the MLPs' saved
bytes). False: autograd keeps ``act(gate)`` too."""
# Tokens of the probe sequence on which merged and unmerged logits are compared.
MERGE_PROBE_TOKENS = 64
ADAPTER_KIND = "finetune-adapter"
CONVERSION_FILE = "linearize_conversion.json"


def peft_config(cfg: LoraConfig) -> PeftLoraConfig:
    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.targets),
                          bias="none", task_type="CAUSAL_LM")


def _get_peft_model(model: nn.Module, cfg: LoraConfig):
    with warnings.catch_warnings():  # peft reads an attribute transformers 5 deprecated, on every call
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, peft_config(cfg))


class Lora:
    """The LoRA :class:`~linearize.train.loop.Stage`. ``prepared`` is the accelerate-wrapped model."""

    name = "lora"

    def __init__(self, run: Run, model: nn.Module, resume_dir: Path | None):
        self.run, self.acc, self.tc = run, run.acc, run.recipe.train
        self.cfg: LoraConfig = run.recipe.lora
        st = run.state.stages[self.name]
        extra = list(conversion_parameters(model)) if self.cfg.train_conversion_parameters else []
        self.peft_model = _get_peft_model(model, self.cfg)
        for _, p in extra:
            p.requires_grad_(True)
        if self.tc.gradient_checkpointing:
            self.peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.params = [p for p in self.peft_model.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in self.params)
        st.results["trainable_parameters"] = trainable
        run.log.info("lora: %d trainable parameters (%d from the conversion)", trainable,
                     sum(p.numel() for _, p in extra))
        optimizer, scheduler = optimizer_and_scheduler(self.params, self.cfg, st.total_steps)
        self.acc.free_memory()
        self.prepared, self.optimizer, self.scheduler = self.acc.prepare(self.peft_model, optimizer, scheduler)
        if resume_dir is not None:
            with quiet_accelerate():
                self.acc.load_state(str(resume_dir))
        self.prepared.train()

    def _head_weight(self) -> torch.Tensor | None:
        """The LM head's weight when the chunked loss applies (on by default; not under FSDP, whose
        flat parameters are only whole inside the wrapped forward)."""
        if not self.cfg.lm_loss_chunk or self.acc.distributed_type == DistributedType.FSDP:
            return None
        return lm_head_weight(self.peft_model.get_base_model())

    def _chunked_losses(self, ids: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """CE (+ KL) from the decoder's hidden states, a chunk of positions at a time (no [T, V] logits)."""
        cfg, base = self.cfg, self.peft_model.get_base_model()
        none = NO_LOGITS.to(ids.device)
        with capture_lm_head_input(base) as box:
            self.prepared(input_ids=ids, use_cache=False, logits_to_keep=none)
            hidden = box.pop("hidden")  # [b, T, d]
            teacher = None
            if cfg.kl_weight:
                with torch.no_grad(), self.peft_model.disable_adapter(), teacher_attention(self.peft_model):
                    self.prepared(input_ids=ids, use_cache=False, logits_to_keep=none)
                teacher = box.pop("hidden")  # [b, T, d]
        with self.acc.autocast():
            ce, kl = chunked_lm_loss(hidden, weight, shifted_labels(ids), teacher, cfg.kl_temperature,
                                     cfg.lm_loss_chunk)
        return {"ce": ce} if kl is None else {"ce": ce, "kl": kl}

    def micro_step(self, ids: torch.Tensor, sync: bool) -> dict[str, torch.Tensor]:
        acc, cfg = self.acc, self.cfg
        weight = self._head_weight()
        light = light_mlps(self.peft_model) if LIGHT_MLP else contextlib.nullcontext()
        trim = trimmed_forward(self.peft_model.get_base_model(), self.tc.malloc_trim_every)
        with contextlib.nullcontext() if sync else acc.no_sync(self.prepared), light, trim:
            if weight is not None:
                metrics = self._chunked_losses(ids, weight)
                loss = metrics["ce"] + cfg.kl_weight * metrics["kl"] if "kl" in metrics else metrics["ce"]
                acc.backward(loss)  # divided by grad_accum inside
                metrics["loss"] = loss
                return metrics
            out = self.prepared(input_ids=ids, labels=ids, use_cache=False)
            ce = out.loss
            metrics = {"ce": ce}
            loss = ce
            if cfg.kl_weight:
                with torch.no_grad(), self.peft_model.disable_adapter(), teacher_attention(self.peft_model):
                    teacher_logits = self.prepared(input_ids=ids, use_cache=False).logits  # [b, T, V]
                t = cfg.kl_temperature
                kl = F.kl_div(
                    F.log_softmax(out.logits.float().flatten(0, 1) / t, dim=-1),
                    F.log_softmax(teacher_logits.float().flatten(0, 1) / t, dim=-1),
                    log_target=True, reduction="batchmean",
                ) * (t * t)
                loss = ce + cfg.kl_weight * kl
                metrics["kl"] = kl
            acc.backward(loss)  # divided by grad_accum inside
        metrics["loss"] = loss
        return metrics

    def optimizer_step(self) -> None:
        if self.tc.max_grad_norm is not None:
            self.acc.clip_grad_norm_(self.params, self.tc.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, folder: Path) -> None:
        self.acc.save_state(str(folder))

    def evaluate(self) -> dict[str, float]:
        if self.run.data.validation is None:
            return {}
        nll = held_out_nll(self.prepared, self.run.eval_blocks(), self.acc, self.run.per_device_batch,
                           self.tc.eval_batches)
        return {"val_loss": nll}

    def finish(self) -> None:
        pass


def rebuild_peft_model(model_cls: type, config, dtype: torch.dtype, lora: LoraConfig,
                       full_state: dict[str, torch.Tensor]):
    """A CPU copy of a trained peft model from its class, config and a gathered state dict (FSDP)."""
    model = model_cls._from_config(copy.deepcopy(config), dtype=dtype)
    peft_model = _get_peft_model(model, lora)
    peft_model.load_state_dict(full_state, strict=True)
    return peft_model


def _readme(recipe: Recipe, conversion_params: bool) -> str:
    load_params = (
        f'base.load_state_dict(load_file("adapter/{CONVERSION_PARAMS_FILE}"), strict=False)  '
        "# the trained gates/mix weights\n" if conversion_params else ""
    )
    return f"""# LoRA adapter of a linearized {recipe.model}

Written by `linearize finetune`. The base model of this adapter is **not** `{recipe.model}` itself but
`{recipe.model}` converted with this run's conversion settings (`{CONVERSION_FILE}`, the same as
`conversion:` in the run's `recipe.yaml`){" plus the conversion parameters trained in this run (`" +
CONVERSION_PARAMS_FILE + "`)" if conversion_params else ""}. The merged result is `../model/`: load
that for inference (`AutoModelForCausalLM.from_pretrained("OUTPUT/model")`); use this adapter to
inspect or continue the LoRA with plain peft:

```python
import json, linearize
from linearize.config import ConversionConfig
from peft import PeftModel
{"from safetensors.torch import load_file" + chr(10) if conversion_params else ""}
conversion = ConversionConfig.from_dict(json.load(open("adapter/{CONVERSION_FILE}")))
base = linearize.convert({recipe.model!r}, conversion)
{load_params}model = PeftModel.from_pretrained(base, "adapter")
```
"""


def save_adapter(peft_model, adapter_dir: Path, recipe: Recipe) -> None:
    """Write the adapter folder atomically: peft's files (with the teacher's name as the base
    model), the trained conversion parameters, the conversion settings and a README."""
    if adapter_dir.is_dir() and (adapter_dir / "adapter_config.json").is_file() and not written_by_linearize(adapter_dir):
        write_marker(adapter_dir, ADAPTER_KIND)  # an adapter of this run written before the marker existed
    peft_model.peft_config["default"].base_model_name_or_path = recipe.model
    extra = {n: p.detach().cpu().contiguous() for n, p in conversion_parameters(peft_model.get_base_model())}
    with atomic_folder(adapter_dir, kind=ADAPTER_KIND, overwrite=True) as tmp:
        peft_model.save_pretrained(str(tmp), save_embedding_layers=False)
        if extra:
            save_file(extra, str(tmp / CONVERSION_PARAMS_FILE))
        conversion = peft_model.get_base_model().config.linearize  # as converted: auto:N resolved to indices
        (tmp / CONVERSION_FILE).write_text(json.dumps(conversion, indent=1) + "\n")
        (tmp / "README.md").write_text(_readme(recipe, bool(extra)))


def merge(peft_model, probe: torch.Tensor):
    """Merge LoRA into the base weights; returns (merged model, relative RMS difference of the
    logits before and after merging on ``probe``)."""
    device = next(peft_model.parameters()).device
    probe = probe[:, :MERGE_PROBE_TOKENS].long().to(device)  # [1, T]
    with torch.no_grad():
        before = peft_model(input_ids=probe, use_cache=False).logits.double()
        merged = peft_model.merge_and_unload()
        after = merged(input_ids=probe, use_cache=False).logits.double()
    return merged, ((after - before).norm() / before.norm()).item()


__all__ = ["Lora", "merge", "peft_config", "rebuild_peft_model", "save_adapter"]
