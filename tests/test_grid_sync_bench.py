"""scripts/bench_grid_sync_gpu.py's kernels on the CPU: the grid-barrier kernel with one program (the only grid the
interpreter can run: it runs programs one after the other, so a second program would never see the first arrive)
counts every arrival and computes each phase; the per-phase kernel computes the same sums."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_grid_sync_gpu.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_grid_sync_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_barrier_and_step_kernels_compute_the_phase_sums() -> None:
    b = _module()
    n_per, phases = 300, 3
    w = torch.randn(n_per, dtype=torch.float16)
    out, count = torch.zeros(1), torch.zeros(1, dtype=torch.int32)
    b._barrier_kernel[(1,)](w, out, count, n_per, phases, BLOCK=128)
    assert int(count.item()) == phases  # one arrival a phase
    assert torch.allclose(out, w.float().sum().reshape(1), rtol=1e-4, atol=1e-3)
    out2 = torch.zeros(1)
    b._step_kernel[(1,)](w, out2, n_per, BLOCK=128)
    assert torch.allclose(out2, out)
