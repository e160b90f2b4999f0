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


def imports(path: Path, package: list[str] | None = None) -> list[str]:
    """Absolute module names a file imports: `from moelab import engine` counts as moelab.engine, and relative
    imports are resolved against the file's package (given, or found from the file's place under moelab/)."""
    tree = ast.parse(path.read_text())
    if package is None:
        package = ["moelab", *path.relative_to(ROOT).parent.parts] if path.is_relative_to(ROOT) else []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            out.append(module)
            if module == "moelab" or node.level and not node.module:  # the names are modules
                out += [f"{module}.{a.name}" for a in node.names]
    return out


def test_the_import_scan_sees_every_form(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("from moelab import engine\nfrom ..engine import scheduler\nfrom . import rotary\n"
                     "import moelab.layers\nfrom moelab.models.loader import read_config\n")
    found = imports(probe, ["moelab", "kernels"])
    assert {"moelab.engine", "moelab.kernels.rotary", "moelab.layers", "moelab.models.loader"} <= set(found), found
    assert found.count("moelab.engine") == 2  # `from moelab import engine` and `from ..engine import scheduler`
    assert level("moelab.engine") > level("moelab.kernels")


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
