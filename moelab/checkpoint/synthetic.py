"""Write a synthetic Hugging Face checkpoint: published shapes, seeded random weights, real file formats.

Each tensor is drawn from its own generator seeded by (seed, name), so the weights do not depend on the
order of writing or on the shard size. Shards are written one at a time: peak host memory is about one
shard.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from moelab.checkpoint.layout import TensorSpec, checkpoint_tensors
from moelab.checkpoint.tokenizer import EOS_ID, PAD_ID, SPECIAL_TOKENS, save_tokenizer
from moelab.hf_config import apply_overrides, spec_from_hf_config
from moelab.presets import preset_config

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
INIT_STD = 0.02
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    num_tensors: int
    num_params: int
    num_shards: int
    total_bytes: int


def init_tensor(t: TensorSpec, seed: int, num_layers: int, dtype: torch.dtype,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """The tensor's seeded initial value. On the CPU it is the value a written checkpoint holds; other devices
    draw from their own generator (same distribution, different numbers, much faster for big models)."""
    if t.init == "ones":
        return torch.ones(t.shape, dtype=dtype, device=device)
    if t.init == "zeros":
        return torch.zeros(t.shape, dtype=dtype, device=device)
    std = {"normal": INIT_STD, "out": INIT_STD / math.sqrt(2 * num_layers), "bias": 0.01}[t.init]
    g = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(t.name.encode())) % (1 << 63))
    out = torch.empty(t.shape, dtype=dtype, device=device)
    return out.normal_(0.0, std, generator=g) if dtype == torch.float32 else \
        torch.randn(t.shape, generator=g, dtype=torch.float32, device=device).mul_(std).to(dtype)


def _plan_shards(tensors: list[TensorSpec], elem_bytes: int, max_shard_bytes: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for t in tensors:
        nbytes = t.numel * elem_bytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def synthetic_config(preset: str, dtype: str = "bfloat16", **overrides: Any) -> dict[str, Any]:
    """The preset's HF config with overrides, token ids of the shipped tokenizer and the dtype."""
    cfg = apply_overrides(preset_config(preset), **overrides)
    if cfg["vocab_size"] < MIN_VOCAB:
        raise ValueError(f"vocab_size {cfg['vocab_size']} too small: the synthetic tokenizer needs >= {MIN_VOCAB}")
    cfg.update(bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, torch_dtype=dtype)
    cfg["moelab_synthetic"] = {"preset": preset, "overrides": {k: v for k, v in overrides.items() if v is not None}}
    return cfg


def write_checkpoint(config: dict[str, Any], out: Path, seed: int = 0, dtype: str = "bfloat16",
                     max_shard_bytes: int = 2 << 30) -> CheckpointInfo:
    """Write config.json, generation_config.json, tokenizer and sharded safetensors with an index."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    spec = spec_from_hf_config(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = DTYPES[dtype]
    elem = torch.empty((), dtype=torch_dtype).element_size()
    tensors = list(checkpoint_tensors(spec))
    shards = _plan_shards(tensors, elem, max_shard_bytes)
    weight_map: dict[str, str] = {}
    total_bytes = 0
    for idx, shard in enumerate(shards, start=1):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{idx:05d}-of-{len(shards):05d}.safetensors"
        data = {t.name: init_tensor(t, seed, spec.num_layers, torch_dtype) for t in shard}
        save_file(data, str(out / fname), metadata={"format": "pt"})
        total_bytes += sum(v.numel() * elem for v in data.values())
        weight_map.update({t.name: fname for t in shard})
        del data
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id"),
           "pad_token_id": config.get("pad_token_id"), "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    save_tokenizer(out, spec.vocab_size)
    return CheckpointInfo(out, len(tensors), sum(t.numel for t in tensors), len(shards), total_bytes)


def make_checkpoint(preset: str, out: Path, seed: int = 0, dtype: str = "bfloat16",
                    max_shard_bytes: int = 2 << 30, **overrides: Any) -> CheckpointInfo:
    return write_checkpoint(synthetic_config(preset, dtype, **overrides), out, seed, dtype, max_shard_bytes)
