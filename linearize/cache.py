"""Cache of a converted layer: recurrent state plus a sliding-window KV ring buffer.

Memory per sequence is constant in context length: the state ``[B, Hkv, F, V]`` and the last
``window - 1`` keys/values (post-RoPE) with their padding flags (plus, for a linear branch that
covers only the tokens beyond the window, the last ``window`` tokens' linear-branch inputs, and the
first ``sink_tokens`` keys/values). It plugs into transformers' own
``Cache`` (e.g. the ``DynamicCache`` that ``generate()`` creates) as the layer object at the
converted layer's index, so kept softmax layers keep their usual ``DynamicLayer``.

A forward talks to it once, as with flash-linear-attention's cache: ``update(...)`` takes this
call's window keys/values and linear-branch inputs and returns a :class:`LayerView` (window keys with
their history, the sink tokens, the recurrent state, the delay line's output); ``store_state(...)``
keeps the new recurrent state at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer


class LinearInputs(NamedTuple):
    """What enters a converted layer's recurrent state at each token."""

    k: torch.Tensor
    """Feature-mapped keys [B, T, Hkv, F]."""
    v: torch.Tensor
    """Values [B, T, Hkv, V] (a column of ones appended when the branch keeps a denominator)."""
    log_g: torch.Tensor
    """Log decays [B, T, Hkv, F], or [B, T, Hkv, 1] for one decay per head (broadcast), fp32."""


class SinkTokens(NamedTuple):
    """The first ``sink_tokens`` valid tokens of each row (fewer until that many arrived)."""

    k: torch.Tensor  # [B, <= n, Hkv, D] post-RoPE
    v: torch.Tensor  # [B, <= n, Hkv, D]
    valid: torch.Tensor  # [B, <= n] bool
    positions: torch.Tensor  # [B, <= n] long


class WindowRing(NamedTuple):
    """The window as a ring buffer for single-token decode: token ``p`` lives in slot ``p % window``,
    written in place, so a step allocates nothing and the softmax reads the slots in any order."""

    k: torch.Tensor  # [B, Hkv, window, D] post-RoPE
    v: torch.Tensor  # [B, Hkv, window, D]
    bias: torch.Tensor  # [B, 1, 1, window] fp32: 0 for a real token, -inf for padding or an empty slot


@dataclass
class LayerView:
    """What one forward of a converted layer reads: this call's tokens joined to the layer's history.

    The tensors keep their autograd history (the cache itself stores detached copies)."""

    past: int
    """Tokens the layer had seen before this call."""
    k: torch.Tensor | None
    """Window keys [B, Tbuf + T, Hkv, D] (post-RoPE): the buffered ones, then this call's; None
    without a window branch."""
    v: torch.Tensor | None
    """Window values [B, Tbuf + T, Hkv, D]."""
    valid: torch.Tensor | None
    """Which window keys are real tokens [B, Tbuf + T] bool."""
    sinks: SinkTokens | None
    """The sink tokens (``sink_tokens > 0``)."""
    state: torch.Tensor | None
    """Recurrent state before this call [B, Hkv, F, V] fp32, or None (empty)."""
    linear: LinearInputs
    """What enters the state at each of this call's tokens: sink tokens' keys zeroed (they never
    enter it), and, for a delayed linear branch, each input as it was ``window`` tokens earlier."""


class HybridCacheLayer(CacheLayerMixin):
    """Recurrent state and window buffer of one converted attention layer.

    ``keep_window``: buffer the window's keys/values; ``sink_tokens``: keep each row's first N
    tokens for good; ``delay``: the linear branch sees a token once it has left the window.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, window: int, *, keep_window: bool = True, sink_tokens: int = 0, delay: bool = False):
        super().__init__()
        self.window = window
        self.keep_window, self.sink_tokens, self.delay = keep_window, sink_tokens, delay
        self.state: torch.Tensor | None = None  # [B, Hkv, F, V] fp32
        self.keys: torch.Tensor | None = None  # [B, <= window - 1, Hkv, D]
        self.values: torch.Tensor | None = None  # [B, <= window - 1, Hkv, D]
        self.valid: torch.Tensor | None = None  # [B, <= window - 1] bool
        # delay: the linear-branch inputs of the last `window` tokens, waiting to leave the window
        # (k, v, log_g of LinearInputs, each [B, window, ...]).
        self.delayed: tuple[torch.Tensor, ...] | None = None
        self.sinks: SinkTokens | None = None
        # The window during single-token decode (``decode_step``): replaces keys/values/valid until
        # a call of several tokens puts it back in order (only one of the two forms is held).
        self.ring: WindowRing | None = None
        self.seen_tokens = 0

    # --- what the mixer uses -------------------------------------------------------------------
    def update(
        self, key_states: torch.Tensor | None, value_states: torch.Tensor, valid: torch.Tensor | None = None, *,
        linear: LinearInputs | None = None,
    ) -> LayerView:
        """Add this call's tokens (window keys [B, T, Hkv, D] post-RoPE or None, values, valid [B, T])
        and linear-branch inputs; return what the forward needs (:class:`LayerView`). The new
        recurrent state comes back through :meth:`store_state` once the forward has it."""
        if not isinstance(valid, torch.Tensor) or not isinstance(linear, LinearInputs):
            raise RuntimeError("a converted layer's cache is updated by its mixer, not by Cache.update")
        past, T = self.seen_tokens, valid.shape[1]
        k = v = valid_all = sinks = None
        if self.keep_window:
            k, v, valid_all = self._window(key_states, value_states, valid)
        if self.sink_tokens:
            sinks, is_sink = self._sinks(key_states, value_states, valid, past)
            linear = linear._replace(k=linear.k * (~is_sink)[:, :, None, None].to(linear.k.dtype))
        if self.delay:
            linear = LinearInputs(*self._delay_line(linear))
        self.seen_tokens += T
        self.is_initialized = True
        return LayerView(past, k, v, valid_all, sinks, self.state, linear)

    def decode_step(self, key: torch.Tensor | None, value: torch.Tensor, valid: torch.Tensor | None
                    ) -> tuple[WindowRing | None, torch.Tensor]:
        """One token without autograd, in place: its window key/value [B, 1, Hkv, D] (post-RoPE; None
        without a window branch) go into the ring slot ``seen_tokens % window``; ``valid`` [B, 1]
        bool, or None when every row's token is real. Returns the ring (None without a window) and the
        recurrent state [B, Hkv, F, V], which the caller advances in place.

        Only for layers without sink tokens or a delay line, once the state exists (after a prefill)."""
        if self.sink_tokens or self.delay or self.state is None:
            raise RuntimeError("decode_step needs a filled cache of a layer without sink tokens or delay line")
        if self.state.dtype != torch.float32 or not self.state.is_contiguous():  # once: updated in place from here on
            self.state = self.state.float().contiguous()
        ring = None
        if self.keep_window:
            ring = self.ring if self.ring is not None else self._build_ring(key)
            slot = self.seen_tokens % self.window
            ring.k[:, :, slot] = key[:, 0]  # [B, Hkv, D]
            ring.v[:, :, slot] = value[:, 0]
            if valid is None:
                ring.bias[..., slot] = 0.0
            else:
                ring.bias[..., slot] = torch.where(valid, 0.0, float("-inf"))[:, :, None]  # [B, 1, 1]
        self.seen_tokens += 1
        self.is_initialized = True
        return ring, self.state

    def _build_ring(self, like: torch.Tensor) -> WindowRing:
        """The ordered window buffer (last <= window - 1 tokens) as a ring of ``window`` slots."""
        B, _, Hkv, D = like.shape
        W = self.window
        k = like.new_zeros(B, Hkv, W, D)  # [B, Hkv, W, D]
        v = like.new_zeros(B, Hkv, W, self.values.shape[-1] if self.values is not None else D)
        bias = torch.full((B, 1, 1, W), float("-inf"), dtype=torch.float32, device=like.device)
        if self.keys is not None and self.keys.shape[1]:
            n = self.keys.shape[1]
            slots = torch.arange(self.seen_tokens - n, self.seen_tokens, device=like.device) % W  # [n]
            k[:, :, slots] = self.keys.transpose(1, 2).to(k.dtype)
            v[:, :, slots] = self.values.transpose(1, 2).to(v.dtype)
            bias[:, 0, 0, slots] = torch.where(self.valid, 0.0, float("-inf"))
        self.ring = WindowRing(k, v, bias)
        self.keys = self.values = self.valid = None
        return self.ring

    def _unring(self) -> None:
        """Put the ring back as the ordered buffer of the last <= window - 1 tokens."""
        ring, W = self.ring, self.window
        n = min(self.seen_tokens, W - 1)
        slots = torch.arange(self.seen_tokens - n, self.seen_tokens, device=ring.k.device) % W  # [n], oldest first
        self.keys = ring.k[:, :, slots].transpose(1, 2).contiguous()  # [B, n, Hkv, D]
        self.values = ring.v[:, :, slots].transpose(1, 2).contiguous()
        self.valid = ring.bias[:, 0, 0, slots] == 0  # [B, n]
        self.ring = None

    def store_state(self, state: torch.Tensor | None) -> None:
        """Keep the recurrent state after this call (the forward's one store)."""
        self.state = None if state is None else state.detach()

    def _window(self, k, v, valid):
        """Buffered plus new keys, values and flags; keeps the last ``window - 1`` (all the next
        token can see)."""
        if self.ring is not None:
            self._unring()
        if self.keys is not None:
            k, v, valid = (torch.cat([old, new], dim=1) for old, new in ((self.keys, k), (self.values, v),
                                                                        (self.valid, valid)))
        start = max(0, k.shape[1] - (self.window - 1))
        self.keys, self.values, self.valid = k[:, start:].detach(), v[:, start:].detach(), valid[:, start:]
        return k, v, valid

    def _sinks(self, k, v, valid, past: int) -> tuple[SinkTokens, torch.Tensor]:
        """The sink set after this call's tokens, and which of them are sinks [B, T] bool."""
        B, T = valid.shape
        n = self.sink_tokens
        pos = (past + torch.arange(T, device=valid.device)).expand(B, T)
        new = (k, v, valid, pos)
        k_c, v_c, valid_c, pos_c = new if self.sinks is None else (
            torch.cat([old, x], dim=1) for old, x in zip(self.sinks, new))
        is_sink = valid_c & (valid_c.cumsum(dim=1) <= n)
        first = torch.sort((~is_sink).to(torch.int8), dim=1, stable=True).indices[:, :n]  # sinks first
        pick = first[:, :, None, None].expand(-1, -1, *k_c.shape[2:])
        sinks = SinkTokens(k_c.gather(1, pick), v_c.gather(1, pick), is_sink.gather(1, first), pos_c.gather(1, first))
        self.sinks = SinkTokens(*(t.detach() for t in sinks))
        return sinks, is_sink[:, -T:]

    def _delay_line(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Each input [B, T, ...] as it was ``window`` tokens earlier (zeros before the first token);
        the tokens still inside the window are kept for the next call."""
        if self.delayed is None:
            self.delayed = tuple(x.new_zeros(x.shape[0], self.window, *x.shape[2:]) for x in inputs)
        T = inputs[0].shape[1]
        joined = [torch.cat([old, new], dim=1) for old, new in zip(self.delayed, inputs)]
        self.delayed = tuple(x[:, -self.window:].detach() for x in joined)
        return tuple(x[:, :T] for x in joined)

    # --- transformers' CacheLayerMixin -----------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def _map(self, fn) -> None:
        for name in ("state", "keys", "values", "valid"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, fn(tensor))
        if self.delayed is not None:
            self.delayed = tuple(fn(t) for t in self.delayed)
        if self.sinks is not None:
            self.sinks = SinkTokens(*(fn(t) for t in self.sinks))
        if self.ring is not None:
            self.ring = WindowRing(*(fn(t) for t in self.ring))

    def reset(self) -> None:
        self.state = self.keys = self.values = self.valid = self.delayed = self.sinks = self.ring = None
        self.seen_tokens = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        pass

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0 and self.seen_tokens > 0:
            raise ValueError(
                "a converted layer's recurrent state cannot be rolled back (crop): assisted/speculative "
                "decoding is not supported on linearized models"
            )

    @property
    def batch_size(self) -> int:
        return -1 if self.state is None else self.state.shape[0]

    def nbytes(self) -> int:
        """Bytes this layer holds (state + window buffer)."""
        tensors = (self.state, self.keys, self.values, self.valid, *(self.delayed or ()), *(self.sinks or ()),
                   *(self.ring or ()))
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def hybrid_layer(cache: Cache, layer_idx: int, make: Callable[[], HybridCacheLayer]) -> HybridCacheLayer:
    """This layer's ``HybridCacheLayer`` inside a transformers ``Cache``, put there (``make()``) on first use.

    ``generate()`` and the models build a ``DynamicCache`` whose layers are ``DynamicLayer``s (made
    eagerly from the config, or lazily): the empty placeholder at a converted layer's index is
    swapped for a ``HybridCacheLayer``; a placeholder that already holds keys is an error.
    """
    layers = cache.layers
    while len(layers) <= layer_idx:
        placeholder = getattr(cache, "layer_class_to_replicate", None) or DynamicLayer
        layers.append(placeholder() if len(layers) < layer_idx else make())
    layer = layers[layer_idx]
    if isinstance(layer, HybridCacheLayer):
        return layer
    if layer.get_seq_length() > 0:
        raise ValueError(
            f"cache layer {layer_idx} already holds softmax keys ({type(layer).__name__}): this cache was filled "
            "by a model that was not converted; start from an empty cache"
        )
    layers[layer_idx] = make()
    return layers[layer_idx]


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by every layer of a cache (hybrid layers and plain KV layers)."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, HybridCacheLayer):
            total += layer.nbytes()
        else:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total


def output_cache(output) -> Cache | None:
    """The cache a model's forward returned: ``output.cache`` in transformers >= 5.2x, the older
    ``output.past_key_values`` before (both ship inside this project's version range)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def cache_kwarg(model) -> str:
    """The name ``model``'s forward takes its cache by: ``cache`` where the signature has it (newer
    transformers), else ``past_key_values`` (a name newer versions still accept, deprecated)."""
    import inspect

    forward = getattr(model, "forward", model)
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):  # a builtin or C-level callable: the long-standing name
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"
