"""Triton kernels for the converted layers (picked by ``linearize.kernels`` for CUDA tensors).

Every op takes the ``[B, T, H, D]`` layout, accumulates in fp32, accepts bf16/fp16/fp32 inputs,
validates its arguments with a ValueError, and (except the decode step) has a Triton backward.
Under ``TRITON_INTERPRET=1`` they run on CPU tensors (slowly: for tests).

- ``gated_linear_attention``  chunked GLA with per-key-dim log decay, GQA, initial/final state,
  packed sequences (``gla.py``)
- ``gla_decode_step``         recurrent step for 1..few tokens, state updated in place (``decode.py``)
- ``sliding_window_attention`` causal window softmax with GQA, key mask, sinks, lse (``swa.py``)
- ``fused_liger_attention``   window + linear branches of Liger attention in one pass (``fused.py``)

Checks: ``tests/test_kernels_triton.py`` compares every kernel with ``reference.py`` (interpreter on
CPU; ``TRITON_INTERPRET=0 pytest -m gpu`` runs the same tests compiled on a GPU), and
``python -m linearize.kernels.triton.compile_check`` compiles every kernel for sm_90 without a GPU
(registers and spills per kernel). Speed: ``benchmarks/bench_kernels.py``,
``benchmarks/bench_decode_kernels.py`` (no GPU numbers recorded yet).
"""

from .decode import gla_decode_step
from .fused import fused_liger_attention
from .gla import gated_linear_attention
from .swa import sliding_window_attention

__all__ = ["fused_liger_attention", "gated_linear_attention", "gla_decode_step", "sliding_window_attention"]
