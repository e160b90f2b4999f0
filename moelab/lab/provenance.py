"""Provenance of a run: where and with what it was made (git sha and dirty flag of the moelab checkout, host,
GPU name and driver, torch / triton / python / moelab versions). Every field is None where it does not apply
(no git checkout, no GPU); each is looked up once per process."""

from __future__ import annotations

import functools
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def _git_info() -> tuple[str | None, bool | None]:
    """(sha, dirty) of the checkout moelab is imported from; (None, None) when it is not a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if sha.returncode != 0:
            return None, None
        st = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True, timeout=10)
        return sha.stdout.strip(), bool(st.stdout.strip()) if st.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None, None


@functools.lru_cache(maxsize=1)
def _gpu_info() -> tuple[str | None, str | None]:
    """(GPU name, driver version) from NVML when it answers, else from torch when it is already imported."""
    name = driver = None
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        try:
            driver = pynvml.nvmlSystemGetDriverVersion()
            if pynvml.nvmlDeviceGetCount() > 0:
                name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
            driver = driver.decode() if isinstance(driver, bytes) else driver
            name = name.decode() if isinstance(name, bytes) else name
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML library, no driver, no GPU: provenance says None
        pass
    if name is None and "torch" in sys.modules:
        torch = sys.modules["torch"]
        try:
            if torch.cuda.is_available():
                name = torch.cuda.get_device_name(0)
        except Exception:
            pass
    return name, driver


@functools.lru_cache(maxsize=1)
def _torch_version() -> str | None:
    """torch.__version__ (with its CUDA tag, e.g. 2.11.0+cu130); None without torch."""
    try:
        import torch
    except ImportError:
        return None
    return str(torch.__version__)


def provenance() -> dict[str, Any]:
    """Where and with what a run was made. The GPU fields are None on a machine without one."""
    sha, dirty = _git_info()
    gpu, driver = _gpu_info()
    torch_v = _torch_version()
    return dict(git_sha=sha, git_dirty=None if dirty is None else int(dirty), host=socket.gethostname(),
                gpu_name=gpu, driver=driver, torch_version=torch_v, triton_version=_version("triton"),
                python_version=platform.python_version(), moelab_version=_version("moelab"))
