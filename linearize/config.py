"""Typed settings, one dataclass per concern. Each field is documented once, here.

``ConversionConfig`` says what replaces each attention layer. It is stored in the converted
model's ``config.json`` (under ``linearize``) so a checkpoint rebuilds itself without this package.
Fields left as ``None`` take the default of the chosen mixer (``MIXER_DEFAULTS``), so
``ConversionConfig(mixer="lizard")`` is the Lizard recipe and ``ConversionConfig()`` is Liger-GLA.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

# The one table of weight dtypes a user can name (CLI --dtype, recipe model_dtype, eval, bench).
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = tuple(DTYPES)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called ``name`` (a key of :data:`DTYPES`), or a ValueError that lists them."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


MIXERS = ("liger", "lizard", "softmax")
GATES = ("gla", "hgrn2", "mamba2", "rwkv6", "scalar", "learned")
FEATURE_MAPS = ("softmax", "hedgehog")
MIXES = ("fixed", "learned")
NORMALIZERS = ("none", "separate", "shared")
LINEAR_SPANS = ("all", "beyond_window")

# Per-mixer defaults, with where each number comes from.
MIXER_DEFAULTS: dict[str, dict[str, Any]] = {
    # Liger (Lan et al. 2025): key-reused GLA gate, τ = 16, softmax feature maps, window 64,
    # o = 0.5·o_swa + 0.5·o_lin with no denominator in the linear branch.
    "liger": dict(
        gate="gla", gate_logit_normalizer=16.0, feature_map="softmax", window=64, use_window=True,
        mix="fixed", window_weight=0.5, normalizer="none", num_sinks=0,
    ),
    # Lizard (Van Nguyen et al. 2025): learned scalar gate per head, Hedgehog feature maps,
    # normalized linear branch, window 128 with m = 4 learned meta-memory sinks, learned α.
    "lizard": dict(
        gate="learned", gate_logit_normalizer=1.0, feature_map="hedgehog", window=128, use_window=True,
        mix="learned", window_weight=0.5, normalizer="separate", num_sinks=4,
    ),
    # The layer is left as the teacher's softmax attention.
    "softmax": dict(
        gate="gla", gate_logit_normalizer=16.0, feature_map="softmax", window=64, use_window=True,
        mix="fixed", window_weight=0.5, normalizer="none", num_sinks=0,
    ),
}


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")


@dataclass
class ConversionConfig:
    """What replaces each attention layer of the teacher."""

    mixer: str = "liger"
    """Mixer for converted layers: ``liger`` (key-reused gates), ``lizard`` (learned gate, sinks) or
    ``softmax`` (keep every layer as it is: the conversion path then changes nothing)."""
    gate: str | None = None
    """Decay gate. From the key itself (no new parameters): ``gla`` log α = logsigmoid(k)/τ per key
    dimension; ``hgrn2`` the same gate with key' = 1 − α; ``mamba2`` log α = −softplus(k)/τ;
    ``rwkv6`` log α = −exp(k)/τ; ``scalar`` k pooled over the head dimension first. ``learned``:
    Lizard's γ = σ(W_γ x), a scalar per token and key/value head."""
    gate_logit_normalizer: float | None = None
    """τ, divides the gate's log decay (Liger: 16). Larger τ means slower forgetting."""
    feature_map: str | None = None
    """φ for queries and keys of the linear branch: ``softmax`` over the head dimension (Liger), or
    ``hedgehog`` [softmax(xW), softmax(−xW)] with a learned W initialised to the identity (Lizard)."""
    window: int | None = None
    """Sliding-window size in tokens, the current one included (Liger: 64, Lizard: 128)."""
    use_window: bool | None = None
    """Keep the sliding-window softmax branch (False: linear branch only)."""
    mix: str | None = None
    """``fixed``: o = w·o_window + (1 − w)·o_linear with w = ``window_weight``; ``learned``: w = σ(a) per
    head, a initialised so that w starts at ``window_weight`` (Lizard's learned α, kept summing to 1
    with the linear branch's weight because Liger reports that this matters)."""
    window_weight: float | None = None
    """Weight of the window branch (Liger: 0.5; the two branch weights sum to 1)."""
    normalizer: str | None = None
    """Linear-branch denominator: ``none`` (Liger), ``separate`` o = φqᵀS / φqᵀz (Lizard), or ``shared``
    one softmax-style denominator across window and linear parts (LoLCATs)."""
    num_sinks: int | None = None
    """Learned sink logits per head in the window's softmax denominator (Lizard's meta-memory: 4)."""
    linear_span: str = "all"
    """Which tokens the linear branch covers: ``all`` of them (Liger, Lizard), or only those that
    have left the window (``beyond_window``, LoLCATs' split: softmax over the last ``window`` tokens,
    linear attention over everything before, one shared denominator). ``beyond_window`` is the
    teacher exactly on contexts up to the window (num_sinks=0) and needs ``normalizer='shared'``; its
    linear part is weighted by a learned per-head scale exp(β), β starting at 0."""
    sink_tokens: int = 0
    """The first N tokens of each sequence stay visible to the window's softmax for good
    (StreamingLLM's attention sinks) and never enter the linear state. Needs
    ``linear_span='beyond_window'``: the layer is then the teacher exactly on the window plus these
    tokens, and linear attention covers only the tokens between them."""
    keep_softmax_layers: list[int] = field(default_factory=list)
    """Layer indices kept as the teacher's softmax attention (inter-layer hybrid). Negative indices
    count from the end."""
    chunk_size: int = 64
    """Chunk length of the chunked PyTorch path (a speed setting; results do not depend on it)."""

    def __post_init__(self) -> None:
        _check_choice("mixer", self.mixer, MIXERS)
        for name, value in MIXER_DEFAULTS[self.mixer].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        _check_choice("gate", self.gate, GATES)
        _check_choice("feature_map", self.feature_map, FEATURE_MAPS)
        _check_choice("mix", self.mix, MIXES)
        _check_choice("normalizer", self.normalizer, NORMALIZERS)
        if self.gate == "learned" and self.mixer == "liger":
            raise ValueError("gate='learned' is Lizard's gate: use mixer='lizard' (liger gates reuse the key)")
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be a positive number of tokens, got {self.window!r}")
        if self.gate_logit_normalizer <= 0:
            raise ValueError(f"gate_logit_normalizer (τ) must be > 0, got {self.gate_logit_normalizer}")
        if self.num_sinks < 0:
            raise ValueError(f"num_sinks must be >= 0, got {self.num_sinks}")
        if self.num_sinks and not self.use_window:
            raise ValueError("num_sinks needs the window branch (use_window=True)")
        if self.normalizer == "shared" and not self.use_window:
            raise ValueError("normalizer='shared' shares the window's denominator: it needs use_window=True")
        _check_choice("linear_span", self.linear_span, LINEAR_SPANS)
        if self.linear_span == "beyond_window" and self.normalizer != "shared":
            raise ValueError(
                "linear_span='beyond_window' splits one softmax between the window and the older tokens: "
                f"it needs normalizer='shared' (got {self.normalizer!r})"
            )
        if self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {self.sink_tokens}")
        if self.sink_tokens and self.linear_span != "beyond_window":
            raise ValueError(
                "sink_tokens keeps the first tokens in the window's softmax instead of the linear state: "
                f"it needs linear_span='beyond_window' (got {self.linear_span!r})"
            )
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        self.keep_softmax_layers = [int(i) for i in self.keep_softmax_layers]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ConversionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown conversion setting(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def layer_kinds(self, num_layers: int) -> list[str]:
        """The mixer of every layer: ``softmax`` for kept layers, ``self.mixer`` for the rest."""
        kept = set()
        for i in self.keep_softmax_layers:
            j = i + num_layers if i < 0 else i
            if not 0 <= j < num_layers:
                raise ValueError(f"keep_softmax_layers has {i}, but the model has {num_layers} layers")
            kept.add(j)
        return ["softmax" if i in kept else self.mixer for i in range(num_layers)]
