"""Imports point one way: kernels -> layers -> models -> engine -> API/server (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import moelab

ROOT = Path(moelab.__file__).parent
LEVEL0 = {"spec", "hf_config", "presets", "context", "summary", "roofline"}
# analysis: pure numpy/pandas on specs and traces (no engine); lab: measures the engine through its public API
LEVELS = {**{m: 0 for m in LEVEL0}, "device": 1, "checkpoint": 1, "kernels": 1, "parallel": 1, "analysis": 1,
          "layers": 2, "models": 3, "engine": 4, "generate": 5, "llm": 5, "server": 5, "lab": 6, "cli": 9}


def level(module: str) -> int | None:
    parts = module.split(".")
    return LEVELS.get(parts[1]) if len(parts) > 1 and parts[0] == "moelab" else None


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return out


def test_no_upward_imports() -> None:
    bad = []
    for path in ROOT.rglob("*.py"):
        mod = "moelab." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
        own = level(mod)
        if own is None:
            continue
        for imp in imports(path):
            other = level(imp)
            if other is not None and other > own:
                bad.append(f"{mod} -> {imp}")
    assert not bad, bad


def test_spec_layer_needs_no_torch() -> None:
    for m in LEVEL0 - {"context"}:
        assert not any(i.split(".")[0] == "torch" for i in imports(ROOT / f"{m}.py")), m


def test_lab_reads_the_engine_through_its_public_api() -> None:
    """docs/lab.md: the lab imports no layers, models or kernels (the kernel benchmark excepted) and touches no
    engine internals (runner, scheduler, block manager, the model's layer list)."""
    import re

    bad = []
    for path in (ROOT / "lab").rglob("*.py"):
        if path.name == "kernel_bench.py":
            continue
        bad += [f"{path.name} imports {i}" for i in imports(path)
                if i.startswith(("moelab.kernels", "moelab.layers", "moelab.models"))]
        bad += [f"{path.name}: {m}" for m in re.findall(r"\.(?:runner|scheduler|block_manager|model\.model)\b",
                                                         path.read_text())]
    assert not bad, bad
