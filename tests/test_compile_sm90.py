"""The engine's Triton kernels compiled for an H100/H200 (sm_90) in CI, where no GPU is: scripts/compile_sm90.py
runs in a subprocess without the interpreter (this suite runs under it) and lowers each kernel to a cubin with
Triton's bundled ptxas. The interpreter tests check what the kernels compute; this catches what only the GPU
compiler sees: a construct its lowering rejects, the PDL wait missing, shared memory over an H100's 227 KB (as the
float32 MoE tiles did on the H200: 262 KB, found there first), registers spilled to local memory. Every kernel
moelab launches must have a case."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
H100_SHARED = 227 * 1024


def _toolchain() -> bool:
    try:
        import triton.backends.nvidia as nv
    except ImportError:
        return False
    return (Path(nv.__file__).parent / "bin" / "ptxas").exists()


pytestmark = pytest.mark.skipif(not _toolchain(), reason="Triton's NVIDIA backend (ptxas) is not installed")


@pytest.fixture(scope="module")
def report() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_sm90.py")], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_case_compiles_for_sm90(report: dict) -> None:
    bad = {}
    for name, r in report.items():
        if not r["ok"]:
            bad[name] = r["error"][:500]
        elif r["pdl_waits"] < 1:
            bad[name] = "no PDL wait in the PTX"
        elif r["shared_bytes"] > H100_SHARED:
            bad[name] = f"{r['shared_bytes']} B of shared memory"
        elif r["local_bytes"]:
            bad[name] = f"registers spill to local memory ({r['local_bytes']} B per thread)"
    assert not bad, bad
    assert len(report) >= 30


def test_the_big_products_get_hopper_tensor_core_instructions(report: dict) -> None:
    """wgmma (Hopper's asynchronous tensor-core instruction) in the fp8 GEMMs, whose narrow rows are computed
    transposed for it (fused_moe.swap_ab; the older mma.sync has no fp8 form on Hopper), in the bf16 and int8
    prefill-size GEMMs (three shapes, no tuned file) and in prefill attention: a Triton or tile change that loses it
    would cost several times the time."""
    want = [n for n in report if "fp8" in n or n.endswith(("bfloat16-M4096", "int8_channel-M4096"))]
    want.append("attention-prefill")
    assert len(want) >= 15
    assert all(report[n]["wgmma"] > 0 for n in want), {n: report[n]["wgmma"] for n in want}


def test_the_moe_gemm_loops_are_software_pipelined(report: dict) -> None:
    """Every fused-MoE GEMM case loads its tiles with asynchronous copies (cp.async or TMA), i.e. Triton
    pipelined its K loop. A load pattern it cannot prove contiguous and aligned compiles to synchronous loads and a
    fraction of the shared memory, and runs several times slower; so does a case compiled without the
    specialization a launch gives (compile_sm90's div16 and unit strides)."""
    gemms = [n for n in report if n.startswith(("moe-gate_up", "moe-down"))]
    assert len(gemms) >= 20
    assert all(report[n]["async_loads"] > 0 for n in gemms), {n: report[n]["async_loads"] for n in gemms}


def test_every_launched_kernel_has_a_case(report: dict) -> None:
    launched = {m for f in (ROOT / "moelab").rglob("*.py") for m in re.findall(r"(_\w+_kernel)\[", f.read_text())}
    assert launched, "no launches found"
    assert launched <= {r["kernel"] for r in report.values()}, launched - {r["kernel"] for r in report.values()}
