"""Typed settings, one dataclass per concern. Each field is documented once, here.

``ConversionConfig`` says what replaces each attention layer. It is stored in the converted
model's ``config.json`` (under ``linearize``) so a checkpoint rebuilds itself without this package.
Fields left as ``None`` take the default of the chosen mixer (``MIXER_DEFAULTS``), so
``ConversionConfig(mixer="lizard")`` is the Lizard recipe and ``ConversionConfig()`` is Liger-GLA.
Every value is checked when the config is made (``ValueError`` "field=value: what is allowed"),
and against the model it converts before anything of that model changes (:meth:`check_model`).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import re
import textwrap
from dataclasses import dataclass, field
from functools import lru_cache
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# The one table of weight dtypes a user can name (CLI --dtype, recipe model_dtype, eval, bench): names of
# torch dtypes, kept free of torch so that parsing a command line stays instant.
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called ``name`` (one of :data:`DTYPE_NAMES`), or a ValueError that lists them."""
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    import torch

    return getattr(torch, name)


MIXERS = ("liger", "lizard", "softmax")
GATES = ("gla", "hgrn2", "mamba2", "rwkv6", "scalar", "learned")
FEATURE_MAPS = ("softmax", "hedgehog")
MIXES = ("fixed", "learned")
NORMALIZERS = ("none", "separate", "shared")
LINEAR_SPANS = ("all", "beyond_window")
LINEARS = ("gla", "delta", "none")

MAX_WINDOW = 1_048_576
"""Longest sliding window (and most sink tokens) accepted, in tokens: 1M. The window's KV buffer and
the delay line hold this many tokens per sequence, so a larger number is a typo, not a setting."""
MAX_NUM_SINKS = 1024
"""Most learned sink logits per head (Lizard uses 4)."""
AUTO_LAYERS = re.compile(r"auto:(\d+)")
"""``keep_softmax_layers: auto:N``: ``convert()`` keeps the N layers :mod:`linearize.layer_probe` suggests."""
MAX_CHUNK_SIZE = 4096
"""Longest chunk of the chunked PyTorch path (its memory grows with T·chunk)."""

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


@dataclass(frozen=True)
class Setting:
    """What one ``ConversionConfig`` field accepts, and its command-line flag."""

    flag: str
    """Option of ``linearize convert`` that sets the field."""
    kind: type
    """``str`` (one of ``choices``), ``bool``, ``int``, ``float`` or ``list`` (of layer indices)."""
    choices: tuple[str, ...] = ()
    low: float | None = None
    """Smallest value (numbers), or None."""
    high: float | None = None
    """Largest value (numbers), or None."""
    above_low: bool = False
    """``low`` itself is excluded (e.g. τ > 0)."""
    unit: str = ""


SETTINGS: dict[str, Setting] = {
    "mixer": Setting("--mixer", str, MIXERS),
    "gate": Setting("--gate", str, GATES),
    "gate_logit_normalizer": Setting("--tau", float, low=0.0, above_low=True),
    "feature_map": Setting("--feature-map", str, FEATURE_MAPS),
    "window": Setting("--window", int, low=1, high=MAX_WINDOW, unit=" tokens"),
    "use_window": Setting("--no-window", bool),
    "mix": Setting("--mix", str, MIXES),
    "window_weight": Setting("--window-weight", float, low=0.0, high=1.0),
    "normalizer": Setting("--normalizer", str, NORMALIZERS),
    "num_sinks": Setting("--sinks", int, low=0, high=MAX_NUM_SINKS),
    "linear_span": Setting("--linear-span", str, LINEAR_SPANS),
    "sink_tokens": Setting("--sink-tokens", int, low=0, high=MAX_WINDOW, unit=" tokens"),
    "keep_softmax_layers": Setting("--keep-softmax", list),
    "chunk_size": Setting("--chunk-size", int, low=1, high=MAX_CHUNK_SIZE, unit=" tokens"),
    "linear": Setting("--linear", str, LINEARS),
}


def _allowed(s: Setting) -> str:
    """What a setting accepts, in words: "an integer from 1 to 1048576 tokens"."""
    if s.kind is str:
        return f"must be one of {', '.join(s.choices)}"
    if s.kind is bool:
        return "must be true or false"
    if s.kind is list:
        return ("must be a list of layer indices (integers; negative ones count from the end) or auto:N "
                "(N layers chosen by probing the teacher, N an integer >= 0)")
    what = "an integer" if s.kind is int else "a finite number"
    low, high = (None if x is None else s.kind(x) for x in (s.low, s.high))
    if low is not None and high is not None:
        return f"must be {what} from {low} to {high}{s.unit}"
    if low is not None:
        return f"must be {what} {'>' if s.above_low else '>='} {low}{s.unit}"
    return f"must be {what}"


def check_setting(name: str, value: Any) -> Any:
    """``value`` checked against ``SETTINGS[name]`` (ints for float fields become floats), or a
    ``ValueError`` "name=value: what is allowed"."""
    s = SETTINGS[name]
    bad = ValueError(f"{name}={value!r}: {_allowed(s)}")
    if s.kind is str:
        if not isinstance(value, str) or value not in s.choices:
            raise bad
        return value
    if s.kind is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if s.kind is list:
        if isinstance(value, str) and AUTO_LAYERS.fullmatch(value.strip()):
            return f"auto:{int(AUTO_LAYERS.fullmatch(value.strip()).group(1))}"
        if not isinstance(value, (list, tuple)) or not all(isinstance(i, Integral) and not isinstance(i, bool)
                                                         for i in value):
            raise bad
        return [int(i) for i in value]
    if isinstance(value, bool) or not isinstance(value, Integral if s.kind is int else Real):
        raise bad
    value = s.kind(value)
    if not math.isfinite(value):
        raise bad
    if s.low is not None and (value < s.low or (s.above_low and value == s.low)):
        raise bad
    if s.high is not None and value > s.high:
        raise bad
    return value


@dataclass
class ConversionConfig:
    """What replaces each attention layer of the teacher."""

    mixer: str = "liger"
    """Mixer for converted layers: ``liger`` (key-reused gates), ``lizard`` (learned gate, sinks) or
    ``softmax`` (keep every layer as it is: the conversion path then changes nothing)."""
    gate: str | None = None
    """Decay gate: ``gla``, ``hgrn2``, ``mamba2``, ``rwkv6`` or ``scalar`` come from the key itself (no
    new parameters), ``learned`` is Lizard's. ``gla``: log α = logsigmoid(k)/τ per key dimension;
    ``hgrn2`` the same gate with key' = 1 − α (per feature: with Hedgehog's 2D features the gate, as
    every per-dimension gate, repeats over both halves, and so does key'); ``mamba2`` log α =
    −softplus(k)/τ; ``rwkv6`` log α = −exp(k)/τ; ``scalar`` k pooled over the head dimension first.
    ``learned``: Lizard's γ = σ(W_γ x), a scalar per token and key/value head."""
    gate_logit_normalizer: float | None = None
    """τ, divides the gate's log decay (Liger: 16). Larger τ means slower forgetting."""
    feature_map: str | None = None
    """φ for queries and keys of the linear branch: ``softmax`` over the head dimension (Liger), or
    ``hedgehog`` [softmax(xW), softmax(−xW)] with a learned W initialised to the identity (Lizard)."""
    window: int | None = None
    """Sliding-window size in tokens, the current one included (Liger: 64, Lizard: 128)."""
    use_window: bool | None = None
    """Keep the sliding-window softmax branch; False (``--no-window``) leaves the linear branch only."""
    mix: str | None = None
    """``fixed``: o = w·o_window + (1 − w)·o_linear with w = ``window_weight``; ``learned``: w = σ(a) per
    head, a initialised so that w starts at ``window_weight`` (Lizard's learned α, kept summing to 1
    with the linear branch's weight because Liger reports that this matters)."""
    window_weight: float | None = None
    """Weight of the window branch, in [0, 1] (Liger: 0.5; the two branch weights sum to 1)."""
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
    keep_softmax_layers: list[int] | str = field(default_factory=list)
    """Layer indices kept as the teacher's softmax attention (inter-layer hybrid), or ``auto:N`` for the
    N layers a retrieval probe of the teacher suggests. Negative indices count from the end.
    ``auto:N``: ``convert()`` probes the teacher (:mod:`linearize.layer_probe`: induction at distance
    512 on random tokens, attention beyond the window on training text) and keeps the N layers it
    suggests; the converted config then holds those indices, and the probe's scores under
    ``linearize_layer_probe``."""
    chunk_size: int = 64
    """Chunk length of the chunked PyTorch path, the one without a GPU (a speed setting: results agree
    to rounding); the Triton kernels keep their own."""
    linear: str = "gla"
    """Update rule of the linear branch: ``gla`` (additive, Liger and Lizard) or ``delta`` (the gated
    delta rule of Gated DeltaNet and Kimi's KDA, which overwrites what a key stored). ``gla`` adds
    φk(k)ᵀv to the decayed state; ``delta`` writes S_t = S'_t + β_t k_t (v_t − S'_tᵀ k_t)ᵀ with
    S'_t = diag(α_t) S_{t−1}. With ``delta`` the same gate decays the state (per-channel gates as KDA, ``scalar``/``learned`` as
    Gated DeltaNet), φq(q) and φk(k) are L2-normalised per head, the write strength
    β_t = σ(W_β x_t) is a new projection per key/value head (starts at β = 0.5), an unset normalizer
    is ``none``, ``separate`` is refused, and ``shared`` weighs the window against the delta read-out
    by the state's match mass (README, "The delta-rule linear branch"). ``none``: no linear branch,
    the layer is the window's softmax alone (with its sink tokens or learned sinks: StreamingLLM's
    attention), the control that asks whether the linear branch earns its keep (issue 16)."""

    def __post_init__(self) -> None:
        self.mixer = check_setting("mixer", self.mixer)
        self.linear = check_setting("linear", self.linear)
        if self.linear == "delta" and self.normalizer is None:
            self.normalizer = "none"  # the delta rule's read-out is already a retrieval, not a sum (see `linear`)
        for name, value in MIXER_DEFAULTS[self.mixer].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in SETTINGS:
            setattr(self, name, check_setting(name, getattr(self, name)))
        self._check_combination()

    def _check_combination(self) -> None:
        """Settings that are valid alone but not together."""
        if self.gate == "learned" and self.mixer == "liger":
            raise ValueError("gate='learned' is Lizard's gate: use mixer='lizard' (liger gates reuse the key)")
        if self.num_sinks and not self.use_window:
            raise ValueError(f"num_sinks={self.num_sinks}: sinks need the window branch (use_window=True)")
        if self.normalizer == "shared" and not self.use_window:
            raise ValueError("normalizer='shared' shares the window's denominator: it needs use_window=True")
        if self.linear_span == "beyond_window" and self.normalizer != "shared":
            raise ValueError(
                "linear_span='beyond_window' splits one softmax between the window and the older tokens: "
                f"it needs normalizer='shared' (got {self.normalizer!r})"
            )
        if self.linear == "none" and not self.use_window:
            raise ValueError("linear='none' leaves only the window branch: it needs use_window=True")
        if self.linear == "delta" and self.normalizer == "separate":
            raise ValueError(
                "normalizer='separate' divides the linear read-out by φqᵀz, a sum of positive weights under the "
                "additive rule; under linear='delta' that column is the state's signed read-out of a constant 1, "
                "which crosses zero, so the ratio is unbounded. Use normalizer='none' (the delta read-out is already "
                "a retrieval: a stored key reads back its value) or 'shared' (weighs the window against it)"
            )
        if self.sink_tokens and self.linear_span != "beyond_window":
            raise ValueError(
                "sink_tokens keeps the first tokens in the window's softmax instead of the linear state: "
                f"it needs linear_span='beyond_window' (got {self.linear_span!r})"
            )

    def check_model(self, num_layers: int, max_positions: int | None) -> None:
        """Refuse settings that do not fit a model of ``num_layers`` layers and a context of
        ``max_positions`` tokens (None: the model declares none). Cheap: run it before loading weights."""
        if max_positions is not None and self.mixer != "softmax":
            for name in ("window", "sink_tokens"):
                value = getattr(self, name)
                if value > max_positions:
                    raise ValueError(
                        f"{name}={value}: must be at most the model's context of {max_positions} tokens "
                        "(max_position_embeddings)"
                    )
        auto = self.auto_layer_count()
        if auto is None:
            self.layer_kinds(num_layers)
        elif auto > num_layers:
            raise ValueError(f"keep_softmax_layers='auto:{auto}': N must be from 0 to the model's {num_layers} layers")

    def auto_layer_count(self) -> int | None:
        """N of ``keep_softmax_layers='auto:N'`` (layers still to be chosen by the probe), else None."""
        if isinstance(self.keep_softmax_layers, str):
            return int(AUTO_LAYERS.fullmatch(self.keep_softmax_layers).group(1))
        return None

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
        if self.auto_layer_count() is not None:
            raise ValueError(f"keep_softmax_layers={self.keep_softmax_layers!r} is not resolved yet: convert() "
                             "probes the teacher to choose the layers (or give the indices, e.g. 0,6,-1)")
        kept = set()
        for i in self.keep_softmax_layers:
            j = i + num_layers if i < 0 else i
            if not 0 <= j < num_layers:
                raise ValueError(
                    f"keep_softmax_layers={self.keep_softmax_layers}: {i} is not a layer of this model "
                    f"({num_layers} layers: indices {-num_layers} to {num_layers - 1})"
                )
            kept.add(j)
        return ["softmax" if i in kept else self.mixer for i in range(num_layers)]


# --- documentation and command-line options, generated from the fields -------------------------------


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (and of its dataclass bases), on one line."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


def _first_sentence(doc: str) -> str:
    text = doc.replace("``", "")
    return re.split(r"(?<=[.!?])\s+", text, maxsplit=1)[0]


def parse_layer_indices(text: str) -> list[int] | str:
    """``"0,6,-1"`` -> ``[0, 6, -1]`` (``""`` -> ``[]``), ``"auto:6"`` -> ``"auto:6"``: the
    ``--keep-softmax`` argument type."""
    if text.strip().lower().startswith("auto"):
        if not AUTO_LAYERS.fullmatch(text.strip()):
            raise argparse.ArgumentTypeError(
                f"keep_softmax_layers={text!r}: auto:N needs N, a whole number of layers to keep (e.g. auto:6)")
        return check_setting("keep_softmax_layers", text.strip())
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"keep_softmax_layers={text!r}: must be comma-separated layer indices (integers), e.g. 0,6,-1"
        ) from None


def conversion_arguments() -> list[tuple[str, dict[str, Any]]]:
    """``linearize convert``'s options, one per :class:`ConversionConfig` field: ``(flag, kwargs)``
    for ``parser.add_argument(flag, **kwargs)``.

    Each option stores into ``dest`` = the field's name, so for the parsed ``args``
    ``ConversionConfig(**{name: getattr(args, name) for name in SETTINGS})`` is the config; an
    option left out gives the field's default (None: the chosen mixer's). Help is the first
    sentence of the field's docstring plus its default.
    """
    docs = field_docs(ConversionConfig)
    fields = {f.name: f for f in dataclasses.fields(ConversionConfig)}
    arguments = []
    for name, s in SETTINGS.items():
        f = fields[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_ = _first_sentence(docs[name])
        if default is None:
            per_mixer = ", ".join(f"{m} {d[name]}" for m, d in MIXER_DEFAULTS.items() if m != "softmax")
            help_ += f" (default: the mixer's; {per_mixer})"
        elif s.kind is list:
            help_ += f" (default: {','.join(map(str, default)) or 'none'})"
        elif s.kind is not bool:
            help_ += f" (default: {default})"
        kwargs: dict[str, Any] = dict(dest=name, default=default)
        if s.kind is bool:
            kwargs.update(action="store_false", help=f"sets {name}=False. {help_}")
        elif s.kind is list:
            kwargs.update(type=parse_layer_indices, metavar="I,J,...|auto:N", help=help_)
        elif s.kind is str:
            kwargs.update(choices=s.choices, help=help_)
        else:
            kwargs.update(type=s.kind, help=help_)
        kwargs["help"] = kwargs["help"].replace("%", "%%")
        arguments.append((s.flag, kwargs))
    return arguments
