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
    n_per, phases, slices = 300, 4, 3
    w = torch.randn(slices * n_per, dtype=torch.float16)
    out, count = torch.zeros(2, 1), torch.zeros(1, dtype=torch.int32)
    chk = torch.zeros(phases, 1)
    b._barrier_kernel[(1,)](w, out, chk, count, n_per, slices, phases, BLOCK=128, POLL=0)
    assert int(count.item()) == phases  # one arrival a phase
    sums = [w[(i % slices) * n_per:(i % slices + 1) * n_per].float().sum() + i for i in range(phases)]
    assert torch.allclose(out[:, 0], torch.stack([sums[phases - 2], sums[phases - 1]])[[phases % 2, 1 - phases % 2]],
                          rtol=1e-4, atol=1e-3)
    # after each barrier the program read the value of the phase before (its own neighbour, with one program)
    assert torch.allclose(chk[1:, 0], torch.stack(sums[:-1]), rtol=1e-4, atol=1e-3)
    out2 = torch.zeros(2, 1)
    b._step_kernel[(1,)](w, out2, 2, n_per, slices, BLOCK=128)
    assert torch.allclose(out2[0, 0], sums[2], rtol=1e-4, atol=1e-3)
