"""Shared test settings: tiny shapes, named tolerances, deterministic seeds."""

import os

# Must be set before any Triton kernel is imported; lets the Triton kernels run on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Relative RMS error allowed per dtype, the same locally and in CI.
RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative RMS error ||a - e|| / ||e|| (computed in fp64)."""
    a, e = actual.double(), expected.double()
    return ((a - e).norm() / e.norm().clamp_min(1e-12)).item()


def assert_close_rms(actual, expected, dtype, what=""):
    err = rel_rms(actual, expected)
    assert err <= RTOL[dtype], f"{what}: relative RMS error {err:.3g} > {RTOL[dtype]:.3g} ({dtype})"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny ops only pay for a second one (and spin when cores are shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
