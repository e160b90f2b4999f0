"""GPU telemetry during a run: a background thread sampling utilization, memory, power and SM clock.

Sources, first that works: NVML through nvidia-ml-py (`pynvml`), else `nvidia-smi --query-gpu ... -lms`
read line by line, else none (a CPU machine): the sampler then records nothing and says why (`reason`).
Samples are (t seconds since start, metric, value) with metrics gpu_util (%), mem_used (MiB), power (W),
sm_clock (MHz). summary() gives mean and max of each over the run.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from typing import Any

METRICS = {"gpu_util": "%", "mem_used": "MiB", "power": "W", "sm_clock": "MHz"}
_SMI_FIELDS = "utilization.gpu,memory.used,power.draw,clocks.sm"


class TelemetrySampler:
    """with TelemetrySampler(interval=0.1) as tel: ...; tel.samples, tel.summary(). Never raises on a machine
    without a GPU: source is None and reason says why."""

    def __init__(self, interval: float = 0.1, device_index: int = 0, enabled: bool = True) -> None:
        if interval <= 0:
            raise ValueError(f"telemetry interval must be > 0 seconds, got {interval}")
        self.interval = interval
        self.device_index = device_index
        self.samples: list[tuple[float, str, float]] = []
        self.source: str | None = None
        self.reason = "disabled" if not enabled else ""
        self._enabled = enabled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None
        self._t0 = 0.0

    def __enter__(self) -> TelemetrySampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if not self._enabled:
            return
        self._t0 = time.perf_counter()
        handle = self._nvml_handle()
        if handle is not None:
            self.source = "nvml"
            self._thread = threading.Thread(target=self._run_nvml, args=(handle,), daemon=True)
        elif shutil.which("nvidia-smi"):
            try:
                self._proc = subprocess.Popen(
                    ["nvidia-smi", f"--query-gpu={_SMI_FIELDS}", "--format=csv,noheader,nounits",
                     f"-lms={max(1, int(self.interval * 1000))}", f"-i={self.device_index}"],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            except OSError as err:
                self.reason = f"nvidia-smi failed to start: {err}"
                return
            self.source = "nvidia-smi"
            self._thread = threading.Thread(target=self._run_smi, daemon=True)
        else:
            self.reason = self.reason or "no GPU telemetry: NVML (nvidia-ml-py) and nvidia-smi are unavailable"
            return
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.source == "nvml":
            try:
                import pynvml  # type: ignore[import-not-found]

                pynvml.nvmlShutdown()
            except Exception:
                pass

    def _nvml_handle(self) -> Any:
        try:
            import pynvml  # type: ignore[import-not-found]
        except ImportError:
            self.reason = "nvidia-ml-py is not installed"
            return None
        try:
            pynvml.nvmlInit()
            return pynvml.nvmlDeviceGetHandleByIndex(self.device_index)
        except Exception as err:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            self.reason = f"NVML unavailable: {err}"
            return None

    def _add(self, t: float, values: dict[str, float | None]) -> None:
        for m, v in values.items():
            if v is not None:
                self.samples.append((t, m, float(v)))

    def _run_nvml(self, handle: Any) -> None:
        import pynvml  # type: ignore[import-not-found]

        def read(fn: Any) -> float | None:
            try:
                return fn()
            except Exception:
                return None

        while not self._stop.is_set():
            t = time.perf_counter() - self._t0
            util = read(lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            mem = read(lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20)
            power = read(lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3)
            clock = read(lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))
            self._add(t, {"gpu_util": util, "mem_used": mem, "power": power, "sm_clock": clock})
            self._stop.wait(self.interval)

    def _run_smi(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            if self._stop.is_set():
                break
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 4:
                continue
            vals = {}
            for m, p in zip(METRICS, parts):
                try:
                    vals[m] = float(p)
                except ValueError:
                    vals[m] = None
            self._add(time.perf_counter() - self._t0, vals)

    def summary(self) -> dict[str, Any]:
        """{"source", "reason", "samples", "<metric>_mean", "<metric>_max"}."""
        out: dict[str, Any] = {"source": self.source, "reason": self.reason or None, "samples": len(self.samples)}
        for m in METRICS:
            vals = [v for _, k, v in self.samples if k == m]
            if vals:
                out[f"{m}_mean"] = sum(vals) / len(vals)
                out[f"{m}_max"] = max(vals)
        return out
