"""Cache of a converted layer: recurrent state plus a sliding-window KV ring buffer.

Memory per sequence is constant in context length: the state ``[B, Hkv, F, V]`` and the last
``window - 1`` keys/values (post-RoPE) with their padding flags (plus, for a linear branch that
covers only the tokens beyond the window, the last ``window`` tokens' linear-branch inputs, and the
first ``sink_tokens`` keys/values). It plugs into transformers' own
``Cache`` (e.g. the ``DynamicCache`` that ``generate()`` creates) as the layer object at the
converted layer's index, so kept softmax layers keep their usual ``DynamicLayer``.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer


class HybridCacheLayer(CacheLayerMixin):
    """Recurrent state and window buffer of one converted attention layer."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, window: int):
        super().__init__()
        self.window = window
        self.state: torch.Tensor | None = None  # [B, Hkv, F, V] fp32
        self.keys: torch.Tensor | None = None  # [B, <= window - 1, Hkv, D]
        self.values: torch.Tensor | None = None  # [B, <= window - 1, Hkv, D]
        self.valid: torch.Tensor | None = None  # [B, <= window - 1] bool
        # linear_span='beyond_window': the linear-branch inputs of the last `window` tokens, waiting
        # to leave the window (feature-mapped keys [B, window, Hkv, F], values [B, window, Hkv, V],
        # log decays [B, window, Hkv, F]).
        self.delayed: tuple[torch.Tensor, ...] | None = None
        # sink_tokens > 0: the first valid tokens of each row, visible to the window's softmax for
        # good (keys [B, <= n, Hkv, D] post-RoPE, values, valid [B, <= n], positions [B, <= n]).
        self.sinks: tuple[torch.Tensor, ...] | None = None
        self.seen_tokens = 0

    # --- what the mixer uses -------------------------------------------------------------------
    def window_inputs(
        self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Buffered plus new keys, values and flags: k, v [B, Tbuf + T, Hkv, D]; valid [B, Tbuf + T]."""
        if self.keys is None:
            return k, v, valid
        return (
            torch.cat([self.keys, k], dim=1),
            torch.cat([self.values, v], dim=1),
            torch.cat([self.valid, valid], dim=1),
        )

    def delay_line(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each input [B, T, ...] as it was ``window`` tokens earlier (zeros before the first token).

        The tokens still inside the window are kept for the next call.
        """
        if self.delayed is None:
            self.delayed = tuple(x.new_zeros(x.shape[0], self.window, *x.shape[2:]) for x in inputs)
        T = inputs[0].shape[1]
        joined = [torch.cat([old, new], dim=1) for old, new in zip(self.delayed, inputs)]
        self.delayed = tuple(x[:, -self.window:].detach() for x in joined)
        return tuple(x[:, :T] for x in joined)

    def sink_inputs(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The buffered sink tokens' (keys, values, valid, positions) followed by the new tokens'."""
        if self.sinks is None:
            return inputs
        return tuple(torch.cat([old, new], dim=1) for old, new in zip(self.sinks, inputs))

    def store_sinks(self, *sinks: torch.Tensor) -> None:
        self.sinks = tuple(t.detach() for t in sinks)

    def store(self, k_all: torch.Tensor, v_all: torch.Tensor, valid_all: torch.Tensor, state, new_tokens: int):
        """Keep the last ``window - 1`` keys/values (all the next token can see) and the new state."""
        keep = self.window - 1
        start = max(0, k_all.shape[1] - keep)
        self.keys = k_all[:, start:].detach()
        self.values = v_all[:, start:].detach()
        self.valid = valid_all[:, start:]
        self.state = None if state is None else state.detach()
        self.seen_tokens += new_tokens
        self.is_initialized = True

    # --- transformers' CacheLayerMixin -----------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("a converted layer's cache is updated by its mixer, not by Cache.update")

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
            self.sinks = tuple(fn(t) for t in self.sinks)

    def reset(self) -> None:
        self.state = self.keys = self.values = self.valid = self.delayed = self.sinks = None
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
        tensors = (self.state, self.keys, self.values, self.valid, *(self.delayed or ()), *(self.sinks or ()))
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def hybrid_layer(cache: Cache, layer_idx: int, window: int) -> HybridCacheLayer:
    """This layer's ``HybridCacheLayer`` inside a transformers ``Cache``, put there on first use.

    ``generate()`` and the models build a ``DynamicCache`` whose layers are ``DynamicLayer``s (made
    eagerly from the config, or lazily): the empty placeholder at a converted layer's index is
    swapped for a ``HybridCacheLayer``; a placeholder that already holds keys is an error.
    """
    layers = cache.layers
    while len(layers) <= layer_idx:
        make = getattr(cache, "layer_class_to_replicate", None) or DynamicLayer
        layers.append(make() if len(layers) < layer_idx else HybridCacheLayer(window))
    layer = layers[layer_idx]
    if isinstance(layer, HybridCacheLayer):
        return layer
    if layer.get_seq_length() > 0:
        raise ValueError(
            f"cache layer {layer_idx} already holds softmax keys ({type(layer).__name__}): this cache was filled "
            "by a model that was not converted; start from an empty cache"
        )
    layers[layer_idx] = HybridCacheLayer(window)
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
