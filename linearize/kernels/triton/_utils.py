"""Helpers shared by the Triton kernels: interpreter detection, block sizes, autotune configs,
dot precision and the sequence/chunk tables that let one kernel serve padded batches and packed
(``cu_seqlens``) sequences alike.

Under ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, used by the tests) two things differ, both
handled here: the autotuner would benchmark every config (so exactly one config is returned), and
blocks are kept at 16 so that tiny test shapes still exercise the multi-block loops.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""True when Triton runs kernels in its CPU interpreter (read once, at import, like Triton does)."""

MIN_BLOCK = 16
"""Smallest block edge: ``tl.dot`` needs every dimension >= 16 on GPUs."""


def block(dim: int, gpu_max: int) -> int:
    """Block edge covering ``dim``: the next power of two, at least 16 and at most ``gpu_max``
    (16 under the interpreter, so small test dims still split into several blocks)."""
    cap = MIN_BLOCK if INTERPRET else gpu_max
    return max(MIN_BLOCK, min(triton.next_power_of_2(dim), cap))


def full_block(dim: int) -> int:
    """Block edge holding all of ``dim`` at once (a power of two, at least 16)."""
    return max(MIN_BLOCK, triton.next_power_of_2(dim))


def configs(options: list[dict], warps: tuple[int, ...] = (4, 8), stages: tuple[int, ...] = (2, 3)) -> list:
    """Autotune configs: the product of ``options`` x warps x stages on GPUs; only the first one
    under the interpreter (its autotuner would otherwise benchmark every config on the CPU)."""
    out = [
        triton.Config(dict(opt), num_warps=w, num_stages=s)
        for opt in (options or [{}])
        for w in warps
        for s in stages
    ]
    return out[:1] if INTERPRET else out


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact fp32 products for fp32 inputs (TF32 would lose ~1e-3),
    the tensor-core default otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_float(name: str, x: torch.Tensor) -> None:
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")


def check_device(*tensors: torch.Tensor) -> None:
    """Triton kernels run on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1)."""
    for x in tensors:
        if x is not None and not x.is_cuda and not INTERPRET:
            raise ValueError(
                f"the Triton kernels need CUDA tensors, got a tensor on {x.device}; use the 'chunked' backend "
                "on CPU (or set TRITON_INTERPRET=1 before importing triton to run the kernels in its interpreter)"
            )


def seq_offsets(B: int, T: int, cu_seqlens: torch.Tensor | None) -> list[int]:
    """Start offsets of every sequence in the flattened ``[B*T]`` token axis, plus the total."""
    if cu_seqlens is None:
        return [b * T for b in range(B + 1)]
    return [int(x) for x in cu_seqlens.tolist()]


def chunk_table(offsets: list[int], size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of ``size`` tokens that never cross a sequence boundary.

    Returns ``blocks`` [NB, 2] int32 rows (sequence n, first flattened token of the block) and
    ``first`` [N + 1] int32, the index of each sequence's first block (``first[N] == NB``).
    """
    rows, first = [], [0]
    for n in range(len(offsets) - 1):
        rows.extend((n, t) for t in range(offsets[n], offsets[n + 1], size))
        first.append(len(rows))
    blocks = torch.tensor(rows or [(0, 0)], dtype=torch.int32).reshape(-1, 2)[: len(rows)]
    return blocks.to(device), torch.tensor(first, dtype=torch.int32, device=device)


_INTERP = tl.constexpr(INTERPRET)


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """``tl.dot`` with an fp32 accumulator. The interpreter multiplies bfloat16 operands as their raw
    16-bit integers (numpy has no bfloat16), so there the (already rounded) operands go up to fp32
    first: the same products a GPU forms exactly from the low-precision operands."""
    if _INTERP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)
