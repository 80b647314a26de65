"""The converted attention layer with a gated delta-rule linear branch (``ConversionConfig.linear='delta'``).

Same layer as :class:`~linearize.mixers.hybrid.HybridAttention` (window branch, mix, sinks, delay
line, cache) with one change in the linear branch: instead of adding φk(k)ᵀv to the decayed state,
it writes with the error-correcting delta rule (Gated DeltaNet, Yang et al. 2024; Kimi's KDA, 2025)

    S'_t = diag(α_t) S_{t-1};  S_t = S'_t + β_t k_t (v_t − S'_tᵀ k_t)ᵀ;  o_t = q_t S_t

so a key overwrites what it stored instead of blurring into it. Key-reused as the additive branch:
α_t is the configured gate of the teacher's own key (per-channel gates ``gla``/``hgrn2``/``mamba2``/
``rwkv6`` give KDA's per-channel decay, ``scalar`` and Lizard's ``learned`` gate Gated DeltaNet's
scalar one); k_t and q_t are the feature-mapped key and query, L2-normalised per head (‖k‖ = 1 with
β ≤ 1 keeps I − β k kᵀ a contraction, so the state stays bounded, and a stored key reads back its
value exactly: scale 1). New parameters: β_t = σ(W_β x_t + b_β), one per token and key/value head.

β is folded into the inputs (k ← √β·k, v ← √β·v gives the same update with β = 1), so the cache's
``LinearInputs(k, v, log_g)`` — the delay line and the sink-token masking included — carries the
delta rule's inputs unchanged.

Denominator (``normalizer``): the ones column appended to v is written like any value column, so the
state's last column z is the delta rule's read-out of "1": q·z ≈ 1 for a query matching a stored
key, ≈ 0 for an unseen one, and signed in between (the read-out weights of the delta rule are not
positive). ``separate`` (divide by q·z) is therefore refused by the config; ``shared`` uses
m = max(q·z, 0) as the linear part's mass against the window's softmax mass:
o = (den_win·o_win + m·o_delta) / (den_win + m), a convex combination of the window softmax and the
delta read-out (bounded whatever q·z does).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..cache import LayerView, LinearInputs
from ..config import ConversionConfig
from ..kernels import RECURRENT_MAX_T
from ..kernels.delta import delta_decode_step, gated_delta_rule
from .hybrid import HybridAttention

# Write strength at conversion: β = σ(b_β) = 0.5 for every token (W_β starts at zero). σ is steepest
# there, so attention transfer moves β fastest in either direction; and softmax feature maps make
# keys positive and strongly correlated, so β = 1 would let every write erase most of the shared
# direction of all older memories, while β → 0 is the additive rule again (the state's read-out
# S'ᵀk is then never subtracted). Half-strength writes keep the error correction without that.
DELTA_BETA_INIT = 0.5
# Gates that give one decay per token and head (Gated DeltaNet); every other gate is per channel (KDA).
SCALAR_GATES = ("scalar", "learned")
# L2 normalisation's floor: an all-zero key (padding, a sink token, the delay line's start) stays zero.
L2_EPS = 1e-6


class DeltaAttention(HybridAttention):
    """Drop-in replacement for a decoder's attention module whose linear branch is the gated delta rule.
    Shapes: x [B, T, hidden]."""

    def __init__(self, teacher: nn.Module, config: ConversionConfig, layer_idx: int, qk_norm: bool):
        if config.linear != "delta":
            raise ValueError(f"DeltaAttention needs ConversionConfig.linear='delta', got {config.linear!r}")
        super().__init__(teacher, config, layer_idx, qk_norm)
        ref = self.q_proj.weight
        self.beta_proj = nn.Linear(self.hidden_size, self.num_kv_heads, device=ref.device)  # β = σ(W_β x + b)
        nn.init.zeros_(self.beta_proj.weight)
        nn.init.constant_(self.beta_proj.bias, math.log(DELTA_BETA_INIT / (1 - DELTA_BETA_INIT)))
        # the convention of the other new parameters: matrices in the model's dtype, vectors fp32
        self.beta_proj.weight.data = self.beta_proj.weight.data.to(ref.dtype)

    # --- inputs ---------------------------------------------------------------------------------
    def write_strength(self, x: torch.Tensor) -> torch.Tensor:
        """β_t = σ(W_β x_t + b_β) in (0, 1): [B, T, Hkv] fp32."""
        w, b = self.beta_proj.weight, self.beta_proj.bias
        return torch.sigmoid(F.linear(x, w.to(x.dtype)).float() + b.float())  # [B, T, Hkv]

    def _linear_inputs(self, x, q, k, v, valid) -> tuple[torch.Tensor, LinearInputs]:
        """The additive branch's inputs (gate, feature maps, padding, ones column), then: φq and φk
        L2-normalised per head, β folded in (k ← √β·k, v ← √β·v), a scalar gate kept as [B, T, Hkv, 1]."""
        fq, (fk, v, log_g) = super()._linear_inputs(x, q, k, v, valid)
        fq = F.normalize(fq.float(), dim=-1, eps=L2_EPS).to(fq.dtype)  # [B, T, H, F]
        fk = F.normalize(fk.float(), dim=-1, eps=L2_EPS)  # [B, T, Hkv, F], zero rows stay zero
        root_beta = self.write_strength(x).sqrt()[..., None]  # [B, T, Hkv, 1]
        k_in = (fk * root_beta).to(fq.dtype)
        v_in = (v.float() * root_beta).to(v.dtype)  # [B, T, Hkv, V(+1)]
        if self.cfg.gate in SCALAR_GATES:
            log_g = log_g[..., :1]  # [B, T, Hkv, 1]: the same decay on every feature
        return fq, LinearInputs(k_in, v_in, log_g)

    # --- branches -------------------------------------------------------------------------------
    @staticmethod
    def _linear_step_(fq: torch.Tensor, linear: LinearInputs, state: torch.Tensor) -> torch.Tensor:
        """One token of the delta rule without autograd, ``state`` [B, Hkv, F, V] (fp32, contiguous)
        advanced in place: decay, read-out of the decayed state at k, rank-1 write of the error, read-out
        at q. fq [B, 1, H, F]; linear as :meth:`_linear_inputs` makes it (β folded into k and v).
        Returns o [B, 1, H, V] fp32."""
        B, _, H, F_dim = fq.shape
        Hkv, V = linear.k.shape[2], linear.v.shape[3]
        k = linear.k.float().reshape(B * Hkv, F_dim, 1)
        state.mul_(linear.log_g.exp().reshape(B, Hkv, -1, 1))  # S' = diag(α) S (scalar gates broadcast)
        flat = state.view(B * Hkv, F_dim, V)
        error = linear.v.float().reshape(B * Hkv, 1, V) - torch.bmm(k.transpose(1, 2), flat)  # v − S'ᵀk: [B·Hkv, 1, V]
        flat.baddbmm_(k, error)  # S = S' + k (v − S'ᵀk)ᵀ
        o = torch.matmul(fq.float().reshape(B, Hkv, H // Hkv, F_dim), state)  # [B, Hkv, G, V]
        return o.view(B, 1, H, V)

    def _fusable(self, view: LayerView) -> bool:
        return False  # the fused op is Liger's additive GLA

    def _linear_branch(self, fq, view: LayerView, keep_state: bool):
        """Gated delta rule from the cached state: o [B, T, H, V(+1)] and the new state [B, Hkv, F, V(+1)];
        decode steps without autograd advance the cached state in place."""
        k, v, log_g = view.linear
        g = log_g[..., 0] if log_g.shape[-1] == 1 else log_g  # [B, T, Hkv] scalar or [B, T, Hkv, F]
        beta = torch.ones(k.shape[:3], dtype=torch.float32, device=k.device)  # folded into k and v
        v = v.to(k.dtype)
        if view.state is not None and fq.shape[1] <= RECURRENT_MAX_T and not torch.is_grad_enabled():
            state = view.state.contiguous()
            o = delta_decode_step(fq, k, v, beta, g, state, scale=1.0)
        else:
            o, state = gated_delta_rule(fq, k, v, beta, g, scale=1.0, initial_state=view.state,
                                        output_final_state=keep_state, chunk_size=self.cfg.chunk_size)
        if self.cfg.normalizer == "shared":
            o = self._shared_terms(o)
        return o, state

    @staticmethod
    def _shared_terms(o: torch.Tensor) -> torch.Tensor:
        """The delta read-out [.., V + 1] as the (numerator, denominator) the shared normalizer adds to
        the window's: mass m = max(q·z, 0) and m·o_delta, so that the combination is
        (den_win·o_win + m·o_delta) / (den_win + m)."""
        read, mass = o[..., :-1].float(), o[..., -1:].float().clamp_min(0.0)  # [B, T, H, V], [B, T, H, 1]
        return torch.cat([read * mass, mass], dim=-1)
