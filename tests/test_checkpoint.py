"""Synthetic checkpoints: files, determinism, tokenizer, and numeric sanity in bf16."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SMALL, tiny_config, write_tiny
from safetensors import safe_open

from moelab.checkpoint.synthetic import make_checkpoint
from moelab.checkpoint.tokenizer import SPECIAL_TOKENS, build_tokenizer, synthetic_tokenizer
from moelab.context import ForwardContext, forward_context
from moelab.models.loader import load_model


def read_all(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


def test_files_and_index(tiny_checkpoints: dict[str, Path]) -> None:
    path = tiny_checkpoints["olmoe"]
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "model.safetensors.index.json"} <= names
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = {p.name for p in path.glob("*.safetensors")}
    assert len(shards) > 1 and set(index["weight_map"].values()) == shards
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in index["weight_map"]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["OlmoeForCausalLM"] and cfg["num_experts"] == 8


def test_mixtral_uses_its_own_tensor_names(tiny_checkpoints: dict[str, Path]) -> None:
    index = json.loads((tiny_checkpoints["mixtral-gqa"] / "model.safetensors.index.json").read_text())
    assert "model.layers.1.block_sparse_moe.experts.3.w3.weight" in index["weight_map"]


def test_weights_depend_on_seed_not_on_sharding(tmp_path: Path) -> None:
    a = read_all(write_tiny("olmoe", tmp_path / "a", seed=1, max_shard_bytes=1 << 16))
    b = read_all(write_tiny("olmoe", tmp_path / "b", seed=1, max_shard_bytes=1 << 30))
    c = read_all(write_tiny("olmoe", tmp_path / "c", seed=2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    w = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a[w], c[w])


def test_tokenizer_is_deterministic_and_round_trips() -> None:
    t1, t2 = build_tokenizer(), build_tokenizer()
    assert t1.to_str() == t2.to_str()
    text = "Experts route tokens: üñí 123 <tags>"
    ids = t1.encode(text).ids
    assert t1.decode(ids) == text and max(ids) < 512 and len(ids) < len(text.encode())


def test_synthetic_tokenizer_has_the_models_vocab_and_every_id_decodes() -> None:
    tok = synthetic_tokenizer(5000)
    assert tok.get_vocab_size() == 5000
    assert all(tok.decode([i]) for i in range(len(SPECIAL_TOKENS), 5000))
    assert synthetic_tokenizer(300).get_vocab_size() == 300


def test_bf16_logits_stay_finite_over_2k_tokens(tmp_path: Path) -> None:
    make_checkpoint("olmoe-1b-7b", tmp_path, dtype="bfloat16", **dict(SMALL, hidden_size=128, layers=4))
    model = load_model(tmp_path, dtype=torch.bfloat16)
    n = 2048
    with torch.no_grad(), forward_context(ForwardContext.for_prompts([n])):
        logits = model.compute_logits(model(torch.randint(4, 320, (n,)), torch.arange(n)))
    assert torch.isfinite(logits).all() and logits.abs().max() < 100


def test_transformers_loads_every_tiny_family(tiny_checkpoints: dict[str, Path]) -> None:
    transformers = pytest.importorskip("transformers")
    for name, path in tiny_checkpoints.items():
        tok = transformers.AutoTokenizer.from_pretrained(path)
        assert tok.decode(tok("hello experts").input_ids) == "hello experts"
        assert transformers.AutoConfig.from_pretrained(path).model_type == tiny_config(name)["model_type"]
