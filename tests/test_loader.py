"""Loader failures name the file and the tensor; fused (transformers-5) expert names load too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_tiny
from safetensors import safe_open
from safetensors.torch import save_file

from moelab.context import ForwardContext, forward_context
from moelab.models.loader import CheckpointError, load_model


@pytest.fixture()
def ckpt(tmp_path: Path) -> Path:
    return write_tiny("olmoe", tmp_path / "ck", max_shard_bytes=1 << 16)


def _shard_of(path: Path, tensor: str) -> Path:
    return path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][tensor]


def _rewrite(shard: Path, edit) -> None:
    with safe_open(str(shard), "pt") as sf:
        data = {k: sf.get_tensor(k) for k in sf.keys()}
    edit(data)
    save_file(data, str(shard))


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path)


def test_missing_shard_file(ckpt: Path) -> None:
    shard = _shard_of(ckpt, "lm_head.weight")
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}: missing .*lm_head.weight"):
        load_model(ckpt)


def test_corrupt_shard_file(ckpt: Path) -> None:
    shard = _shard_of(ckpt, "model.norm.weight")
    shard.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=f"{shard.name}: cannot read"):
        load_model(ckpt)


def test_missing_expert_tensor(ckpt: Path) -> None:
    name = "model.layers.1.mlp.experts.5.up_proj.weight"
    _rewrite(_shard_of(ckpt, name), lambda d: d.pop(name))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_model(ckpt)


def test_missing_plain_tensor_without_index(tmp_path: Path) -> None:
    path = write_tiny("olmoe", tmp_path / "one", max_shard_bytes=1 << 30)
    _rewrite(path / "model.safetensors", lambda d: d.pop("model.layers.0.self_attn.k_norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model\.layers\.0\.self_attn\.k_norm\.weight"):
        load_model(path)


def test_shape_mismatch(ckpt: Path) -> None:
    name = "model.layers.0.self_attn.o_proj.weight"
    shard = _shard_of(ckpt, name)
    _rewrite(shard, lambda d: d.update({name: torch.zeros(3, 3)}))
    with pytest.raises(CheckpointError, match=f"{shard.name}: tensor {name}: shape \\(3, 3\\)"):
        load_model(ckpt)


def test_unexpected_tensor(ckpt: Path) -> None:
    shard = _shard_of(ckpt, "model.norm.weight")
    _rewrite(shard, lambda d: d.update({"model.bogus.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="model.bogus.weight has no place"):
        load_model(ckpt)


def test_fused_expert_names_load_identically(tmp_path: Path) -> None:
    src = write_tiny("olmoe", tmp_path / "per_expert", max_shard_bytes=1 << 30)
    dst = tmp_path / "fused"
    shutil.copytree(src, dst)

    def fuse(d: dict) -> None:
        for layer in range(2):
            p = f"model.layers.{layer}.mlp.experts"
            gate = [d.pop(f"{p}.{e}.gate_proj.weight") for e in range(8)]
            up = [d.pop(f"{p}.{e}.up_proj.weight") for e in range(8)]
            down = [d.pop(f"{p}.{e}.down_proj.weight") for e in range(8)]
            d[f"{p}.gate_up_proj"] = torch.cat([torch.stack(gate), torch.stack(up)], dim=1)
            d[f"{p}.down_proj"] = torch.stack(down)

    _rewrite(dst / "model.safetensors", fuse)
    a, b = load_model(src), load_model(dst)
    ids = torch.randint(4, 320, (6,))
    with torch.no_grad(), forward_context(ForwardContext.for_prompts([6])):
        assert torch.equal(a(ids, torch.arange(6)), b(ids, torch.arange(6)))
