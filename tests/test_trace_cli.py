"""`moelab trace` end to end on a tiny checkpoint: the saved trace is the engine's real routing."""

from __future__ import annotations

import argparse
from pathlib import Path

from moelab.analysis.trace import RoutingTrace
from moelab.lab.trace_cli import cmd_trace


def test_trace_command_saves_engine_routing(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "t.npz"
    args = argparse.Namespace(model=str(tiny_checkpoints["qwen2-moe-dense-first"]), layers=None, batch=3,
                              input_len=10, output_len=4, device="cpu", seed=0, out=str(out),
                              measure_overhead=False, trials=1, json=None)
    cmd_trace(args)
    t = RoutingTrace.load(out)
    assert t.source == "engine" and t.layer_ids == (1, 2)  # layer 0 is dense (mlp_only_layers)
    assert t.num_tokens == 3 * 10 + 3 * 3  # prompts, then every sampled token fed back but the last
    assert (t.counts.sum(axis=2) == t.tokens[:, None] * t.top_k).all()
    assert t.provenance["synthetic_weights"] is False
