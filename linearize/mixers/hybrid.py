"""The converted attention layer: gated linear attention + sliding-window softmax attention.

One module covers Liger (key-reused gates, fixed 0.5/0.5 mix, no denominator) and Lizard (learned
scalar gate, Hedgehog feature maps, normalized linear branch, sinks, learned mix); the
``ConversionConfig`` picks the parts. The pretrained ``q_proj``/``k_proj``/``v_proj``/``o_proj``
(and ``q_norm``/``k_norm``) are reused under their original names, so teacher weights load as they
are and LoRA targets carry over.
"""

from __future__ import annotations

from collections import deque

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..cache import HybridCacheLayer, LayerView, LinearInputs, hybrid_layer
from ..config import ConversionConfig
from ..kernels import (
    RECURRENT_MAX_T,  # steps this short, without gradients, advance the cached state with the decode op
    fused_liger_attention,
    gated_linear_attention,
    gla_decode_step,
    resolve_backend,
    sliding_window_attention,
)
from ..kernels.chunked import gla_step_, window_step
from ..kernels.chunked_backward import reused_outputs
from .parts import HedgehogFeatureMap, apply_rope, key_gate

# Keyword the model's forward pre-hook uses to hand the 2D padding mask [B, past + T] down to the
# mixers (decoder layers pass unknown keyword arguments on to their attention module).
PADDING_MASK_KWARG = "linearize_padding_mask"
# Lizard's gate starts slow: σ(bias) ≈ 0.98 (a few hundred tokens of memory).
LEARNED_GATE_BIAS_INIT = 4.0
# Smallest linear-branch denominator (normalized variants), as in flash-linear-attention.
DENOMINATOR_EPS = 1e-6
# Masked logit of the sink tokens' softmax (finite: an all-masked row then has finite gradients).
MASKED_LOGIT = -1e30
# Smallest total weight when two softmaxes are merged (both empty: a padding query).
EMPTY_SOFTMAX_EPS = 1e-30
RECOMPUTE_IN_BACKWARD = True
"""When a backward will follow (grad enabled, no cache, the chunked backend), the layer keeps its
input, q, k, v, o_proj's input and the GLA / window ops' outputs for the backward and recomputes
everything between the projections there (feature maps, gates, RoPE, the cache's delay line, the
sink-token softmax, the mix): ``torch.utils.checkpoint`` (non-reentrant, so the autograd graph and
every gradient are the same) around that part, with the ops' segments handing back their first
outputs instead of running again (``kernels.chunked_backward.reused_outputs``); no matmul runs
twice. Subclasses with another linear op (``linear: delta``) keep autograd's saved tensors. False:
autograd keeps every intermediate. SmolLM2 default recipe, T = 2048: the 24 converted layers' saved
tensors 1.93 -> 0.42 GB (plus ~0.24 GB of replayed outputs); with the LoRA step's light MLPs, peak
RSS of the LoRA stage 7.3 -> 5.8 GB at the same step time (+0.3%, benchmarks/results/memory_cpu.md)."""


def merge_softmax(o_a, lse_a, o_b, lse_b):
    """One softmax from two over disjoint key sets: outputs [B, T, H, D], log-normalizers [B, T, H]
    (-inf for an empty set)."""
    lse_a, lse_b = lse_a.float(), lse_b.float()
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isinf(m), 0.0, m)  # finite everywhere, so that no gradient is NaN
    w_a, w_b = torch.exp(lse_a - m), torch.exp(lse_b - m)  # in [0, 1], one of them 1 unless both sets are empty
    den = (w_a + w_b).clamp_min(EMPTY_SOFTMAX_EPS)
    o = (o_a.float() * w_a[..., None] + o_b.float() * w_b[..., None]) / den[..., None]
    return o.to(o_a.dtype), m + torch.log(den)


class HybridAttention(nn.Module):
    """Drop-in replacement for a decoder's attention module. Shapes: x [B, T, hidden]."""

    def __init__(self, teacher: nn.Module, config: ConversionConfig, layer_idx: int, qk_norm: bool):
        super().__init__()
        self.cfg = config
        self.layer_idx = layer_idx
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            teacher.q_proj, teacher.k_proj, teacher.v_proj, teacher.o_proj
        )
        self.q_norm = teacher.q_norm if qk_norm else None
        self.k_norm = teacher.k_norm if qk_norm else None
        self.head_dim = teacher.head_dim
        self.num_heads = self.q_proj.out_features // self.head_dim
        self.num_kv_heads = self.k_proj.out_features // self.head_dim
        self.scaling = float(teacher.scaling)
        self.hidden_size = self.q_proj.in_features
        # Teacher's own softmax window (Gemma3 local layers), used by teacher_forward only.
        self.teacher_sliding_window = getattr(teacher, "sliding_window", None)
        self.run_as_teacher = False

        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        if config.feature_map == "hedgehog":
            self.feature_map_q = HedgehogFeatureMap(H, D)
            self.feature_map_k = HedgehogFeatureMap(Hkv, D)
        if config.gate == "learned":
            self.gate_proj = nn.Linear(self.hidden_size, Hkv)  # γ = σ(W_γ x), one per token and kv head
            nn.init.zeros_(self.gate_proj.weight)
            nn.init.constant_(self.gate_proj.bias, LEARNED_GATE_BIAS_INIT)
        if config.mix == "learned" and config.normalizer != "shared":  # a shared denominator weighs the branches itself
            w = torch.full((H,), float(config.window_weight))
            self.window_logit = nn.Parameter(torch.logit(w.clamp(1e-4, 1 - 1e-4)))  # w = σ(logit), per head
        if config.linear_span == "beyond_window":
            self.linear_log_scale = nn.Parameter(torch.zeros(H))  # β: the linear part weighs exp(β)
        if config.num_sinks:
            self.sinks = nn.Parameter(torch.zeros(H, config.num_sinks))  # meta-memory logits
        ref = self.q_proj.weight
        for p in self.new_parameters():
            p.data = p.data.to(device=ref.device, dtype=ref.dtype if p.dim() > 1 else torch.float32)

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters the conversion added (trained by attention transfer)."""
        reused = {id(p) for m in (self.q_proj, self.k_proj, self.v_proj, self.o_proj, self.q_norm, self.k_norm)
                  if m is not None for p in m.parameters()}
        return [p for p in self.parameters() if id(p) not in reused]

    # --- projections ----------------------------------------------------------------------------
    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)  # [B, T, H, D]
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # [B, T, Hkv, D]
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # [B, T, Hkv, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def _window_weight(self, dtype) -> torch.Tensor:
        if self.cfg.mix == "learned":
            return torch.sigmoid(self.window_logit).to(dtype)[:, None]  # [H, 1]
        return torch.tensor(self.cfg.window_weight, dtype=dtype)

    # --- forward --------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        cache = cache if cache is not None else past_key_values
        if self.run_as_teacher:  # training signal only: the cache is neither read nor written
            return self.teacher_forward(hidden_states, position_embeddings, attention_mask), None
        padding = kwargs.get(PADDING_MASK_KWARG)
        if cache is not None and self._decodes_in_place(hidden_states):
            layer = hybrid_layer(cache, self.layer_idx, self._new_cache_layer)
            if layer.state is not None:
                return self.decode_step(hidden_states, position_embeddings, padding, layer), None
        if cache is None and self._recomputes(hidden_states):
            return self._recomputed_forward(hidden_states, position_embeddings, padding), None
        return self.hybrid_forward(hidden_states, position_embeddings, padding, cache), None

    # --- training: recompute in the backward ----------------------------------------------------
    def _recomputes(self, x: torch.Tensor) -> bool:
        """Whether this (cache-less) call recomputes in the backward (``RECOMPUTE_IN_BACKWARD``)."""
        return (
            RECOMPUTE_IN_BACKWARD and torch.is_grad_enabled()
            and type(self)._linear_branch is HybridAttention._linear_branch  # its ops' outputs replay
            and resolve_backend(None, x) == "chunked"
            and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        )

    def _recomputed_forward(self, x, position_embeddings, padding_mask) -> torch.Tensor:
        """``hybrid_forward`` without a cache, the part between the projections recomputed in the
        backward except for the ops' forwards: the first run records the GLA / window segments'
        outputs, the recomputation replays them. The q/k/v projections and o_proj (matmuls) stay
        outside: autograd keeps q, k, v and o_proj's input, and the recomputation runs no matmul."""
        B, T, _ = x.shape
        q, k, v = self._qkv(x)
        store: deque = deque()
        runs = []

        def run(x, q, k, v, position_embeddings, padding_mask):
            replay = bool(runs)
            runs.append(replay)
            with reused_outputs(store, replay=replay):
                return self._attend(x, q, k, v, position_embeddings, padding_mask)

        o = checkpoint(run, x, q, k, v, position_embeddings, padding_mask, use_reentrant=False)
        return self.o_proj(o.reshape(B, T, -1).to(x.dtype))

    # --- single-token decode --------------------------------------------------------------------
    def _decodes_in_place(self, x: torch.Tensor) -> bool:
        """Whether this call is a single-token step that ``decode_step`` covers: one token, no
        autograd or autocast, the chunked backend (the Triton path keeps its own decode kernel), and
        a conversion without sink tokens, delay line, learned sink logits or shared denominator."""
        return (
            x.shape[1] == 1 and self._in_place_config and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled(x.device.type) and resolve_backend(None, x) == "chunked"
        )

    @property
    def _in_place_config(self) -> bool:
        cfg = self.cfg
        return (not cfg.sink_tokens and not cfg.num_sinks and cfg.linear_span == "all"
                and cfg.normalizer != "shared")

    @staticmethod
    def _linear_step_(fq: torch.Tensor, linear: LinearInputs, state: torch.Tensor) -> torch.Tensor:
        """One token of the linear branch without autograd, ``state`` [B, Hkv, F, V] (fp32,
        contiguous) advanced in place; fq [B, 1, H, F]. Returns o [B, 1, H, V] fp32. (Subclasses with
        another recurrence override it.)"""
        return gla_step_(fq, linear.k, linear.v, linear.log_g, state, scale=1.0)

    def decode_step(self, x, position_embeddings, padding_mask, layer: HybridCacheLayer) -> torch.Tensor:
        """One token from a filled cache: the same output as ``hybrid_forward`` in a few fused ops,
        the recurrent state and the window ring buffer updated in place (nothing of the cache is
        allocated per token). x [B, 1, hidden]."""
        cfg = self.cfg
        B = x.shape[0]
        H = self.num_heads
        q, k, v = self._qkv(x)  # [B, 1, H|Hkv, D]
        valid = None if padding_mask is None else padding_mask[:, -1:].to(device=x.device, dtype=torch.bool)  # [B, 1]
        fq, linear = self._linear_inputs(x, q, k, v, valid)
        k_r = None
        if cfg.use_window:
            cos, sin = position_embeddings
            qk_r = apply_rope(torch.cat([q, k], dim=2), cos, sin)  # [B, 1, H + Hkv, D]: one rotation for both
            q_r, k_r = qk_r[:, :, :H], qk_r[:, :, H:]
        ring, state = layer.decode_step(k_r, v, valid)
        o = self._linear_step_(fq, linear, state)  # [B, 1, H, V(+1)] fp32
        if cfg.normalizer != "none":
            o = self._normalize(o)
        if cfg.use_window:
            o_win = window_step(q_r, ring.k, ring.v, ring.bias, self.scaling, may_see_nothing=valid is not None)
            if cfg.mix == "fixed":
                w = float(cfg.window_weight)
                o = o_win.mul_(w).add_(o, alpha=1.0 - w)  # w·o_win + (1 − w)·o_lin
            else:
                w = self._window_weight(torch.float32)  # [H, 1]
                o = o_win.mul_(w).add_(o * (1 - w))
        return self.o_proj(o.reshape(B, 1, -1).to(x.dtype))

    def hybrid_forward(self, x, position_embeddings, padding_mask=None, cache=None) -> torch.Tensor:
        """Linear-branch inputs, one cache update, the window and linear branches, their combination,
        one store of the new state. Without a cache the layer runs on a fresh, throw-away one."""
        B, T, _ = x.shape
        q, k, v = self._qkv(x)
        o = self._attend(x, q, k, v, position_embeddings, padding_mask, cache)
        return self.o_proj(o.reshape(B, T, -1).to(x.dtype))

    def _attend(self, x, q, k, v, position_embeddings, padding_mask=None, cache=None) -> torch.Tensor:
        """Everything between the projections: o [B, T, H, D] before o_proj."""
        cfg = self.cfg
        B, T, _ = x.shape
        valid = self._new_key_valid(padding_mask, B, T, x.device)  # [B, T] bool
        fq, linear = self._linear_inputs(x, q, k, v, valid)
        q_r = k_r = None
        if cfg.use_window:  # after the linear inputs: the order of q's and k's uses fixes how their gradients sum
            cos, sin = position_embeddings
            q_r, k_r = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        layer = self._new_cache_layer() if cache is None else hybrid_layer(cache, self.layer_idx, self._new_cache_layer)
        view = layer.update(k_r, v, valid, linear=linear)
        keep_state = cache is not None
        if self._fusable(view):  # Liger's fixed mix, nothing buffered: one op for both branches
            o, state = fused_liger_attention(
                fq, view.linear.k, view.linear.log_g, q_r, view.k, view.v, window=cfg.window,
                window_weight=float(cfg.window_weight), scale_lin=1.0, scale_swa=self.scaling,
                initial_state=view.state, output_final_state=keep_state, key_mask=view.valid,
                sinks=getattr(self, "sinks", None), chunk_size=cfg.chunk_size,
            )  # [B, T, H, D]
        else:
            o_lin, state = self._linear_branch(fq, view, keep_state)  # [B, T, H, V(+1)]
            if cfg.use_window:
                o = self._combine(*self._window_branch(q_r, view), o_lin)
            else:
                o = self._normalize(o_lin) if cfg.normalizer != "none" else o_lin
        layer.store_state(state)
        return o

    def _new_cache_layer(self) -> HybridCacheLayer:
        cfg = self.cfg
        return HybridCacheLayer(cfg.window, keep_window=cfg.use_window, sink_tokens=cfg.sink_tokens,
                                delay=cfg.linear_span == "beyond_window")

    def _linear_inputs(self, x, q, k, v, valid) -> tuple[torch.Tensor, LinearInputs]:
        """Feature-mapped queries [B, T, H, F] and what enters the state (no RoPE): φk(k) (or HGRN2's
        1 − α), values (plus a ones column that accumulates the denominator), log decays ([B, T, Hkv, F],
        or [B, T, Hkv, 1] for a gate with one decay per head: the ops take it as it is, and the chunked
        GLA then runs its matmul-only scalar-decay form, ``kernels.chunked.SCALAR_DECAY``); padding
        (``valid`` [B, T] False; None: no padding) adds nothing and does not decay the state."""
        cfg = self.cfg
        if cfg.gate == "learned":
            log_g = F.logsigmoid(self.gate_proj(x).float()).unsqueeze(-1) / cfg.gate_logit_normalizer  # [B,T,Hkv,1]
        else:
            log_g = key_gate(k, cfg.gate, cfg.gate_logit_normalizer)  # [B, T, Hkv, D or 1]
        if cfg.feature_map == "hedgehog":
            fq, fk = self.feature_map_q(q), self.feature_map_k(k)  # [B, T, H|Hkv, 2D]
        else:
            fq, fk = q.softmax(dim=-1), k.softmax(dim=-1)  # [B, T, H|Hkv, D]
        F_dim = fk.shape[-1]
        if log_g.shape[-1] == 1:  # one decay per head stays [B, T, Hkv, 1] (the ops' scalar-decay form)
            if cfg.gate == "hgrn2":  # except where the key is made from it feature by feature
                log_g = log_g.expand(-1, -1, -1, F_dim)
        elif log_g.shape[-1] != F_dim:
            log_g = log_g.repeat(1, 1, 1, F_dim // log_g.shape[-1])  # hedgehog doubles the features
        if cfg.gate == "hgrn2":  # HGRN2: the key is the complement of the forget gate, feature by feature
            fk = (1 - log_g.exp()).to(fk.dtype)  # [B, T, Hkv, F]
        if valid is not None:  # None: every token is real
            keep = valid[:, :, None, None]
            fk = fk * keep.to(fk.dtype)
            log_g = log_g * keep
        if cfg.normalizer != "none":
            v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # [B, T, Hkv, D + 1]: last column sums z
        return fq, LinearInputs(fk, v, log_g.float())  # decays stay fp32 whatever the activations' dtype

    def _fusable(self, view: LayerView) -> bool:
        """Whether both branches run as one fused op: Liger's fixed mix without a normalizer, and no
        window keys buffered from earlier calls (training, and the first prefill)."""
        cfg = self.cfg
        return cfg.use_window and cfg.normalizer == "none" and cfg.mix == "fixed" and view.past == 0

    def _linear_branch(self, fq, view: LayerView, keep_state: bool):
        """Gated linear attention from the cached state; decode steps advance it in place."""
        k, v, log_g = view.linear
        if view.state is not None and fq.shape[1] <= RECURRENT_MAX_T and not torch.is_grad_enabled():
            state = view.state.contiguous()
            return gla_decode_step(fq, k, v, log_g, state, scale=1.0), state
        return gated_linear_attention(fq, k, v, log_g, scale=1.0, initial_state=view.state,
                                      output_final_state=keep_state, chunk_size=self.cfg.chunk_size)

    def _window_branch(self, q_r, view: LayerView) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax over the window (with the learned sink logits) and the sink tokens that have left
        it: o [B, T, H, D] and its log-normalizer lse [B, T, H]."""
        o, lse = sliding_window_attention(
            q_r, view.k, view.v, window=self.cfg.window, scale=self.scaling, key_mask=view.valid,
            sinks=getattr(self, "sinks", None),
        )  # [B, T, H, D], [B, T, H]
        if self.cfg.sink_tokens:
            o, lse = merge_softmax(o, lse, *self._sink_attention(q_r, view))
        return o, lse

    def _sink_attention(self, q_r, view: LayerView):
        """Softmax over the sink tokens that have left the window: o [B, T, H, D] fp32, lse [B, T, H]
        (-inf where there are none)."""
        B, T = q_r.shape[:2]
        k_s, v_s, valid_s, pos_s = view.sinks
        pos = (view.past + torch.arange(T, device=q_r.device)).expand(B, T)
        group = self.num_heads // self.num_kv_heads
        k_s, v_s = k_s.repeat_interleave(group, dim=2), v_s.repeat_interleave(group, dim=2)
        logits = torch.einsum("bthd,bshd->bths", q_r.float(), k_s.float()) * self.scaling
        left = valid_s[:, None, :] & (pos_s[:, None, :] <= pos[:, :, None] - self.cfg.window)  # [B, T, n]
        left = left[:, :, None, :]  # [B, T, 1, n]
        logits = logits.masked_fill(~left, MASKED_LOGIT)
        lse = torch.logsumexp(logits, dim=-1)  # [B, T, H], finite
        p = torch.exp(logits - lse[..., None]) * left
        o = torch.einsum("bths,bshd->bthd", p, v_s.float())
        lse = torch.where(left.any(dim=-1), lse, float("-inf"))  # no sink has left the window yet
        return o, lse

    def _normalize(self, o_lin: torch.Tensor) -> torch.Tensor:
        num, den = o_lin[..., :-1].float(), o_lin[..., -1:].float()
        return num / den.clamp_min(DENOMINATOR_EPS)

    def _combine(self, o_win: torch.Tensor, lse: torch.Tensor, o_lin: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if cfg.normalizer == "shared":
            # LoLCATs: one denominator. y = (num_win + num_lin) / (den_win + den_lin), divided through by
            # den_win = exp(lse) for stability.
            log_inv = -lse.clamp(min=-80.0)  # [B, T, H]
            if cfg.linear_span == "beyond_window":
                log_inv = log_inv + self.linear_log_scale.float()
            inv = torch.exp(log_inv)[..., None]  # [B, T, H, 1]
            num_lin, den_lin = o_lin[..., :-1].float(), o_lin[..., -1:].float()
            return (o_win.float() + num_lin * inv) / (1 + den_lin * inv)
        if cfg.normalizer == "separate":
            o_lin = self._normalize(o_lin)
        w = self._window_weight(torch.float32)
        return w * o_win.float() + (1 - w) * o_lin.float()

    @staticmethod
    def _new_key_valid(padding_mask, B: int, T: int, device) -> torch.Tensor:
        """Which of the T new tokens are real (not padding): [B, T] bool."""
        if padding_mask is None:
            return torch.ones(B, T, dtype=torch.bool, device=device)
        return padding_mask[:, -T:].to(device=device, dtype=torch.bool)

    # --- teacher --------------------------------------------------------------------------------
    def teacher_forward(self, x, position_embeddings, attention_mask=None) -> torch.Tensor:
        """The teacher's softmax attention with the current projections (LoRA included), no cache.

        attention_mask: the mask transformers built for this layer (4D bool/float, or None = causal).
        """
        B, T, _ = x.shape
        q, k, v = self._qkv(x)
        cos, sin = position_embeddings
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        group = self.num_heads // self.num_kv_heads
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        mask = attention_mask
        if mask is not None and mask.dim() == 4:
            mask = mask[:, :, :, -T:]
        elif mask is None and self.teacher_sliding_window and T > self.teacher_sliding_window:
            i = torch.arange(T, device=x.device)
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - self.teacher_sliding_window)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, scale=self.scaling
        )  # [B, H, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
