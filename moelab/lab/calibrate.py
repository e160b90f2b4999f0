"""Calibration: the machine's measured ceilings (the denominators of every floor), stored and cached.

Measured, each as the median of `iters` timed repetitions after one warm-up:

- copy_bandwidth (B/s): y.copy_(x) on the device, bytes read + written (2 x size) / time. CUDA: 1 GiB bf16,
  CUDA events. CPU: 256 MiB float32, perf_counter.
- matmul_bf16, matmul_fp32 (FLOP/s): 2 n^3 / time of an n x n @ n x n product (CUDA n = 8192 bf16,
  4096 fp32 (TF32 off, torch's default); CPU n = 1024).
- matmul_fp8 (FLOP/s): torch._scaled_mm on float8_e4m3fn, n = 8192, bf16 output (CUDA with fp8 only).
- h2d_bandwidth (B/s): pinned host -> device copy of 256 MiB, bytes / time (CUDA only).

What cannot be measured on a machine (fp8 and host-to-device on the CPU) is listed under "skipped" with the
reason. A calibration is a store run of kind "calibrate" keyed by the device ("cuda:<GPU name>" or
"cpu:<CPU model>@<host>") and is also written to a small JSON cache ($MOELAB_CACHE or
~/.cache/moelab/calibration.json). The benchmarks use the latest calibration of the same device: the store's
first, then the cache's, else they measure one.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moelab.lab.store import ResultsStore, now_iso
from moelab.roofline import Ceilings

UNITS = {"copy_bandwidth": "B/s", "h2d_bandwidth": "B/s", "matmul_bf16": "FLOP/s", "matmul_fp32": "FLOP/s",
         "matmul_fp8": "FLOP/s"}
MATMUL_FOR_DTYPE = {"bfloat16": "matmul_bf16", "float16": "matmul_bf16", "float32": "matmul_fp32",
                    "fp8": "matmul_fp8"}


def cache_path() -> Path:
    return Path(os.environ.get("MOELAB_CACHE") or Path.home() / ".cache" / "moelab") / "calibration.json"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_key(device: str) -> str:
    """"cuda:<GPU name>" for a CUDA device, "cpu:<CPU model>@<host>" for the CPU (its speed is the host's)."""
    import torch

    if device.startswith("cuda"):
        idx = torch.device(device).index or 0
        return f"cuda:{torch.cuda.get_device_name(idx)}"
    if device != "cpu":
        raise ValueError(f"device {device!r}; allowed: cpu, cuda, cuda:N")
    return f"cpu:{_cpu_model()}@{socket.gethostname()}"


def resolve_device(device: str) -> str:

    from moelab.device import default_device

    if device == "auto":
        return default_device()
    from moelab.device import check_device

    return check_device(device)


def _median_time(fn: Callable[[], Any], iters: int, cuda: bool) -> float:
    import torch

    fn()
    if cuda:
        torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            ts.append(s.elapsed_time(e) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def measure(device: str = "auto", iters: int = 10, quick: bool = False) -> dict[str, Any]:
    """Measure the ceilings of one device. Returns {"device", "device_key", "values": {metric: value},
    "sizes": {metric: description}, "skipped": {metric: reason}}. quick: smaller sizes (tests)."""
    import torch

    device = resolve_device(device)
    cuda = device.startswith("cuda")
    values: dict[str, float] = {}
    sizes: dict[str, str] = {}
    skipped: dict[str, str] = {}
    scale = 16 if quick else 1
    with torch.inference_mode():
        n_copy = (1 << 29 if cuda else 1 << 26) // scale
        dt = torch.bfloat16 if cuda else torch.float32
        x = torch.empty(n_copy, dtype=dt, device=device).fill_(1.0)
        y = torch.empty_like(x)
        nbytes = x.numel() * x.element_size()
        values["copy_bandwidth"] = 2 * nbytes / _median_time(lambda x=x, y=y: y.copy_(x), iters, cuda)
        sizes["copy_bandwidth"] = f"{nbytes / 2**20:.0f} MiB {str(dt).replace('torch.', '')}, read + write"
        del x, y
        for name, dtype, n in (("matmul_bf16", torch.bfloat16, 8192 if cuda else 1024),
                               ("matmul_fp32", torch.float32, 4096 if cuda else 1024)):
            n = max(256, n // (4 if quick else 1))
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            values[name] = 2 * n ** 3 / _median_time(lambda a=a, b=b: a @ b, iters, cuda)
            sizes[name] = f"{n}^3"
            del a, b
        if cuda and hasattr(torch, "float8_e4m3fn") and hasattr(torch, "_scaled_mm"):
            n = 8192 // (4 if quick else 1)
            try:
                a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
                b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()  # column-major, as cuBLASLt wants
                one = torch.ones((), device=device)
                fn = lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
                values["matmul_fp8"] = 2 * n ** 3 / _median_time(fn, iters, cuda)
                sizes["matmul_fp8"] = f"{n}^3 e4m3 -> bf16"
            except (RuntimeError, TypeError) as err:
                skipped["matmul_fp8"] = f"torch._scaled_mm failed: {str(err).splitlines()[0][:160]}"
        else:
            skipped["matmul_fp8"] = "needs a CUDA GPU with fp8 matmul (sm89+)"
        if cuda:
            n = (1 << 28) // scale
            h = torch.empty(n, dtype=torch.uint8, pin_memory=True)
            d = torch.empty(n, dtype=torch.uint8, device=device)
            values["h2d_bandwidth"] = n / _median_time(lambda: d.copy_(h, non_blocking=True), iters, cuda)
            sizes["h2d_bandwidth"] = f"{n / 2**20:.0f} MiB pinned"
            del h, d
        else:
            skipped["h2d_bandwidth"] = "no device: host-to-device copy needs CUDA"
    return {"device": device, "device_key": device_key(device), "values": values, "sizes": sizes,
            "skipped": skipped, "iters": iters, "measured_at": now_iso()}


def record(store: ResultsStore, cal: dict[str, Any]) -> str:
    """Store a calibration as a run of kind "calibrate" (one row per ceiling) and in the JSON cache."""
    run_id = store.start_run("calibrate", {"device": cal["device"], "device_key": cal["device_key"]},
                             {"iters": cal["iters"]}, extra={"skipped": cal["skipped"], "sizes": cal["sizes"]},
                             point=f"calibrate:{cal['device_key']}:{cal['measured_at']}")
    store.add(run_id, [{"metric": m, "value": v, "unit": UNITS[m], "size": cal["sizes"].get(m)}
                       for m, v in cal["values"].items()])
    store.finish_run(run_id)
    cal = {**cal, "run_id": run_id, "store": str(store.path)}
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        cache = json.loads(path.read_text()) if path.is_file() else {}
        cache[cal["device_key"]] = cal
        path.write_text(json.dumps(cache, indent=1))
    except (OSError, json.JSONDecodeError):
        pass  # the cache is a convenience; the store has the calibration
    return run_id


def latest(store: ResultsStore, key: str) -> dict[str, Any] | None:
    """The newest stored calibration of this device key (the store's, else the cache's), or None."""
    runs = store.runs(kind="calibrate", status="ok")
    runs = runs[[c.get("device_key") == key for c in runs["config"]]] if not runs.empty else runs
    if not runs.empty:
        run = runs.iloc[-1]
        rows = store.rows(run_id=run["run_id"])
        return {"device": run["config"]["device"], "device_key": key, "run_id": run["run_id"],
                "values": dict(zip(rows["metric"], rows["value"])), "skipped": run["extra"].get("skipped", {}),
                "measured_at": run["started_at"], "store": str(store.path)}
    path = cache_path()
    try:
        cache = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return None
    return cache.get(key)


def get_calibration(store: ResultsStore, device: str, fresh: bool = False) -> dict[str, Any]:
    """The latest calibration of `device` (or a new one, measured and recorded, when none or fresh). A GPU is
    always measured afresh (MEASURING.md: the ceilings of the same call; a GPU of one name can be another card,
    clocked otherwise, since); the caller memoizes per process. The calibration a run cites is always in the
    run's own store: one taken from the JSON cache is recorded there first, under its own measured_at."""
    device = resolve_device(device)
    fresh = fresh or device.startswith("cuda")
    cal = None if fresh else latest(store, device_key(device))
    if cal is not None and cal.get("store") != str(store.path):  # from the JSON cache: into this store
        recordable = all(k in cal for k in ("sizes", "iters", "device"))
        cal = {**cal, "run_id": record(store, cal)} if recordable else None  # else measured below
    if cal is None:
        cal = measure(device)
        cal["run_id"] = record(store, cal)
    return cal


def ceilings(cal: dict[str, Any], dtype: str) -> Ceilings:
    """Ceilings for a run in `dtype`: the copy bandwidth and the matmul rate of that dtype (bf16's for fp16;
    bf16's when the dtype's own rate was not measured)."""
    if dtype not in MATMUL_FOR_DTYPE:
        raise ValueError(f"dtype {dtype!r}; allowed: {', '.join(MATMUL_FOR_DTYPE)}")
    v = cal["values"]
    rate = v.get(MATMUL_FOR_DTYPE[dtype]) or v["matmul_bf16"]
    return Ceilings(v["copy_bandwidth"], rate, cal["device_key"])
