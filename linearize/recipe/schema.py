"""The finetuning recipe's schema: one typed dataclass tree. YAML keys, ``key=value`` overrides and the
``linearize finetune --help`` text all come from it.

A recipe says which teacher to load, how to convert it (``conversion``: a
:class:`linearize.config.ConversionConfig`), which text to train on (``data``), which stages to
run (``stages``: ``attention_transfer`` and/or ``lora``, each with its own optimiser settings) and
how (``train``: batch, precision, checkpoints). Every field is documented once, in the string under
it; :func:`recipe_help` turns those strings into the CLI help.

    recipe = load_recipe("recipes/smollm2-135m-cpu-lizard.yaml", ["lora.r=16", "train.seed=1"])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from ..config import DTYPE_NAMES, ConversionConfig

DtypeName = Literal[DTYPE_NAMES]  # the one dtype table: linearize.config.DTYPES
REQUIRED_KEYS = {
    "model": "the teacher, e.g. model: smollm2-135m (or a hub id, a folder, a .gguf file)",
    "output_dir": "the run folder, e.g. output_dir: runs/my-run",
}
"""Keys a recipe file (with its overrides) must set: without them a stray or empty file would
silently train the default teacher into a default folder."""


class RecipeError(ValueError):
    """A recipe key or value is wrong; the message names the key and where it came from."""


@dataclass
class DataConfig:
    """Which text to train on and how it becomes fixed-length token blocks."""

    source: str = "gensim-wiki"
    """Where the text comes from: a hub dataset id (e.g. ``yahma/alpaca-cleaned``), a local
    ``.json``/``.jsonl``/``.txt``/``.parquet`` file, a folder or glob of them, or ``gensim-wiki``
    (the offline English Wikipedia sample shipped with gensim; its last 20 articles are held out)."""
    name: str | None = None
    """Configuration (subset) name of a hub dataset."""
    split: str = "train"
    """Split of the source to train on."""
    validation_split: str | None = None
    """Split of the source used for held-out perplexity (e.g. ``validation``; ``heldout`` for
    ``gensim-wiki``). Left out: ``validation_samples`` documents are held out of the train split."""
    validation_samples: int = 0
    """Documents taken out of the train split for held-out perplexity when there is no
    ``validation_split`` (0: no validation unless the source has a held-out split)."""
    format: Literal["auto", "text", "alpaca", "chat"] = "auto"
    """How a row becomes text: ``text`` uses ``text_field``; ``alpaca`` the Stanford Alpaca prompt
    over ``instruction``/``input``/``output``; ``chat`` the tokenizer's chat template over
    ``messages`` or the Alpaca fields; ``auto`` picks from the columns (Alpaca fields go through the
    chat template when the tokenizer has one)."""
    text_field: str = "text"
    """Column holding the text for ``format: text``."""
    max_samples: int | None = None
    """Use at most this many training documents (after shuffling), e.g. Liger's 50K Alpaca rows."""
    shuffle: bool = True
    """Shuffle documents (seeded by ``train.seed``) before taking ``max_samples`` and validation."""
    seq_len: int = 1024
    """Tokens per packed training sequence. Documents are joined with EOS and cut into blocks."""
    max_tokens: int | None = None
    """Token budget: keep at most this many packed training tokens (whole blocks); epochs repeat them."""
    bos_per_block: Literal["auto"] | bool = "auto"
    """Start every packed block with the tokenizer's BOS token (each block then holds ``seq_len - 1``
    tokens of text). Models trained with a leading ``<bos>`` (Gemma) see a block cut mid-document
    as out of distribution without it. ``auto``: on when the tokenizer puts BOS before each text
    (Gemma; not SmolLM2 or Qwen) and the format is not ``chat`` (chat templates write their own)."""

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("source must name a dataset, a file or 'gensim-wiki'")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 tokens, got {self.seq_len}")
        if self.validation_samples < 0:
            raise ValueError(f"validation_samples must be >= 0, got {self.validation_samples}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or null, got {self.max_samples}")
        if self.max_tokens is not None and self.max_tokens < self.seq_len:
            raise ValueError(f"max_tokens={self.max_tokens} is less than one block of seq_len={self.seq_len}")


@dataclass
class StageOptim:
    """Optimiser and schedule of one stage (AdamW)."""

    epochs: float = 1.0
    """Passes over the packed training blocks (fractions allowed)."""
    max_steps: int | None = None
    """Stop after this many optimiser steps (caps ``epochs``)."""
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    warmup_steps: int = 0
    """Linear warmup steps at the start of the stage."""
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    """Learning-rate schedule after warmup (transformers' ``get_scheduler``)."""

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or null, got {self.max_steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")


@dataclass
class AttentionTransferConfig(StageOptim):
    """Stage 1: train only what the conversion added (gates, mix weights, sinks, feature maps) to
    match each layer's teacher attention output on the teacher's own hidden states (sum of per-layer
    MSEs; layers are independent)."""


@dataclass
class LoraConfig(StageOptim):
    """Stage 2: peft LoRA on the reused projections, next-token cross-entropy (+ optional KL to the
    teacher's logits)."""

    r: int = 8
    """LoRA rank (Liger and Lizard: 8)."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha / r (Lizard: 16)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])
    """Module names that get LoRA adapters (Liger and Lizard: q, k, v projections)."""
    train_conversion_parameters: bool = True
    """Also train what the conversion added (gates, mix weights, sinks, feature maps)."""
    kl_weight: float = 0.0
    """Weight of KL(teacher ‖ student) on the next-token distributions (0: cross-entropy only). The
    teacher is the same model with adapters disabled and softmax attention."""
    kl_temperature: float = 1.0
    """Softmax temperature of the KL term (the term is scaled by T²)."""
    lm_loss_chunk: int = 256
    """Score cross-entropy and KL through the LM head this many positions at a time, never holding
    the [T, vocab] logits (exact: ``linearize.train.lm_loss``); 0: the model's own full logits. 256
    rather than 512: 0.2 GB less peak RSS on the SmolLM2 default recipe at the same tokens/s."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("targets must name at least one module, e.g. [q_proj, k_proj, v_proj]")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")
        if self.kl_temperature <= 0:
            raise ValueError(f"kl_temperature must be > 0, got {self.kl_temperature}")
        if self.lm_loss_chunk < 0:
            raise ValueError(f"lm_loss_chunk must be >= 0 (0: full logits), got {self.lm_loss_chunk}")


@dataclass
class TrainConfig:
    """How every stage runs: batch, precision, checkpoints, logging."""

    batch_size: int = 8
    """Sequences per micro-step across all processes (split between them, so a recipe takes the
    same steps on 1 or N devices). Must be a multiple of the number of processes."""
    grad_accum: int = 1
    """Micro-steps per optimiser step (effective batch = batch_size × grad_accum sequences)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Mixed precision of forward/backward (accelerate autocast); master weights stay in
    ``model_dtype``. fp16 applies to the LoRA stage (attention transfer then runs in fp32)."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this (null: no clipping)."""
    gradient_checkpointing: bool = False
    """Recompute whole decoder layers in the backward pass of the LoRA stage (less memory, slower: the
    SmolLM2 default recipe's step took 1.33x the CPU time; the converted layers already recompute their
    cheap parts without it)."""
    malloc_trim_every: int = 0
    """Hand glibc's free heap pages back to the OS after every this many decoder layers of the LoRA
    forward, and once before each stage and the final evaluation (0: never): lower peak RSS for a few
    % more time (SmolLM2 default recipe's LoRA stage at 2 threads, 10: peak RSS 6.0-6.6 -> 5.1-5.2 GB,
    tokens/s -11%; benchmarks/results/memory_cpu.md). No effect off glibc."""
    seed: int = 0
    """Seed of initialisation, data order and dropout."""
    eval_every: int = 0
    """Held-out loss every this many optimiser steps (0: only before and after training)."""
    eval_batches: int | None = None
    """Evaluate on at most this many validation batches (null: all of them)."""
    save_every: int = 0
    """Write a checkpoint every this many optimiser steps (0: only at the end of each stage)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (older ones are deleted)."""
    log_every: int = 10
    """Log loss and throughput every this many optimiser steps."""
    tensorboard: bool = True
    """Log to TensorBoard (under ``output_dir/logs``) when ``tensorboard`` is installed."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "malloc_trim_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or null, got {self.max_grad_norm}")
        if self.eval_batches is not None and self.eval_batches < 1:
            raise ValueError(f"eval_batches must be >= 1 or null, got {self.eval_batches}")


@dataclass
class Recipe:
    """A finetuning recipe: teacher, conversion, data, stages, training settings, output folder."""

    model: str = "smollm2-135m"
    """Teacher: hub id, local HF folder, ``.gguf`` file, or ``smollm2-135m`` (the offline default)."""
    model_dtype: DtypeName = "float32"
    """dtype the teacher's weights are loaded in (the master weights during training)."""
    conversion: ConversionConfig = field(default_factory=ConversionConfig)
    """How each attention layer is converted (see ``linearize convert --help``)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training text."""
    stages: list[Literal["attention_transfer", "lora"]] = field(default_factory=lambda: ["lora"])
    """Stages to run, in order: ``attention_transfer`` and/or ``lora``."""
    attention_transfer: AttentionTransferConfig = field(default_factory=AttentionTransferConfig)
    """Settings of the attention-transfer stage."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Settings of the LoRA stage."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batch, precision, checkpoints and logging, shared by the stages."""
    output_dir: str = "runs/finetune"
    """Folder for checkpoints, the merged model (``model/``), the adapter (``adapter/``) and
    ``training_summary.json``."""
    accelerate_config: str | None = None
    """The accelerate config this recipe is meant to run under (relative paths are relative to the
    recipe file), e.g. FSDP on 8 GPUs: launch with ``accelerate launch --config_file <it> -m
    linearize finetune <recipe>``. Informational: a run with another setup logs a warning."""

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("stages is empty: a recipe must run attention_transfer and/or lora")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages lists a stage twice: {self.stages}")
        if self.stages == ["lora", "attention_transfer"]:
            raise ValueError("attention_transfer must come before lora (it trains the unadapted model)")
        if not self.output_dir:
            raise ValueError("output_dir must name a folder")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
