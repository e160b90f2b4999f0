from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from moelab.cli import main


def test_inspect_prints_totals(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--preset", "olmoe-1b-7b"]) == 0
    out = capsys.readouterr().out
    assert "6.919 B" in out and "KV cache bytes / token" in out and "131,072" in out


def test_inspect_rejects_unknown_preset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--preset", "nope"]) == 2
    assert "available: olmoe-1b-7b" in capsys.readouterr().err


def test_make_checkpoint_with_overrides(tmp_path: Path) -> None:
    args = ["make-checkpoint", "--preset", "deepseek-v3", "--out", str(tmp_path), "--layers", "2",
            "--hidden-size", "64", "--experts", "16", "--top-k", "4", "--moe-intermediate-size", "32",
            "--vocab-size", "300", "--heads", "2", "--dtype", "float32"]
    assert main(args) == 0
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["n_routed_experts"], cfg["first_k_dense_replace"]) == (2, 16, 1)


def test_generate_default_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--max-tokens", "4"]) == 0
    out = capsys.readouterr().out
    ids = re.findall(r"token ids: \[([0-9, ]+)\]", out)
    assert len(ids) == 2 and all(len(x.split(",")) == 4 for x in ids)  # two prompts, four tokens each
    assert re.search(r"batch 2: 8 output tokens in [0-9.]+ s = [0-9.]+ output tok/s", out)
    assert out.count("[length]") == 2
