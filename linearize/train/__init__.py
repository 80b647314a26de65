"""Finetune a converted model as a recipe says: attention transfer, then LoRA, through accelerate.

One job per module, in the spirit of torchtune's recipe interface:

- ``state``: the typed run state (``RunState``/``StageState``), checkpoints (atomic, rotated) and
  the resume decision (``plan_resume``: what a resumed run may change, which stages it extends).
- ``loop``: the optimiser-step loop (``run_stage``) against a small ``Stage`` interface.
- ``transfer``: stage 1, attention transfer (``AttentionTransfer``, ``transfer_errors``).
- ``lora``: stage 2, LoRA (``Lora``), the adapter folder and the merge.
- ``metrics``: held-out NLL shared by the stages; ``optim``: optimiser, schedule, step counts.
- ``finetune``: ``finetune(recipe)``, the orchestration from output folder to merged model.

The batch of a micro-step is global (split between processes), so a recipe takes the same optimiser
steps on one or several processes. ``resume=True`` continues from the last checkpoint with the same
data order, optimiser and scheduler state.
"""

from .finetune import FinetuneResult, check_stages, finetune
from .metrics import held_out_nll
from .state import (
    ADAPTER_DIR, CHECKPOINT_DIR, CONVERSION_PARAMS_FILE, MODEL_DIR, RECIPE_FILE, STATE_FILE, SUMMARY_FILE,
    ResumeError, RunState,
)
from .transfer import transfer_errors

__all__ = [
    "ADAPTER_DIR", "CHECKPOINT_DIR", "CONVERSION_PARAMS_FILE", "FinetuneResult", "MODEL_DIR", "RECIPE_FILE",
    "STATE_FILE", "SUMMARY_FILE", "ResumeError", "RunState", "check_stages", "finetune", "held_out_nll",
    "transfer_errors",
]
