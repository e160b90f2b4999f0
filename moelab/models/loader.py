"""Load a model from a local Hugging Face checkpoint directory.

Streams one tensor at a time from each safetensors shard straight to the target device (safetensors reads
it there) and casts it into the already-allocated parameter, so peak host memory stays near one tensor.
Per-expert tensors go into the stacked expert weights; transformers-5 fused names (experts.gate_up_proj,
experts.down_proj) are accepted too. Every failure names the file and the tensor.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from moelab.hf_config import spec_from_hf_config
from moelab.layers.moe.layer import ExpertWeights
from moelab.models.decoder import MoECausalLM
from moelab.models.registry import MODELS
from moelab.spec import ModelSpec

_EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<e>\d+)\.(?P<proj>\w+)\.weight$")
_FUSED = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<proj>gate_up_proj|down_proj)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class CheckpointError(ValueError):
    pass


def read_config(path: Path) -> dict:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing; a checkpoint directory needs config.json")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({err})") from err


def read_generation_config(path: Path) -> dict | None:
    """generation_config.json beside config.json, or None when the checkpoint has none."""
    gen_file = Path(path) / "generation_config.json"
    if not gen_file.is_file():
        return None
    try:
        gen = json.loads(gen_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{gen_file}: not valid JSON ({err})") from err
    if not isinstance(gen, dict):
        raise CheckpointError(f"{gen_file}: expected a JSON object, got {type(gen).__name__}")
    return gen


def shard_files(path: Path) -> dict[Path, list[str] | None]:
    """Shard file -> tensor names the index promises (None when there is no index)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files: dict[Path, list[str]] = {}
        for name, fname in weight_map.items():
            files.setdefault(path / fname, []).append(name)
        for f, names in files.items():
            if not f.is_file():
                raise CheckpointError(f"{f}: missing (the index maps {len(names)} tensors to it, e.g. {names[0]})")
        return dict(files)
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{path}: no *.safetensors files and no model.safetensors.index.json")
    return {f: None for f in found}


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(spec: ModelSpec, dtype: torch.dtype, device: torch.device | str, moe_backend: str = "naive",
                top_k: int | None = None) -> MoECausalLM:
    """Allocate the model's parameters (uninitialized) on the device in the dtype."""
    with default_dtype(dtype), torch.device(device):
        return MODELS[spec.family](spec, moe_backend=moe_backend, top_k=top_k)


class _Targets:
    """Maps checkpoint names to parameters and tracks what has been filled."""

    def __init__(self, model: MoECausalLM) -> None:
        self.model = model
        self.params = dict(model.named_parameters())
        self.experts = {name: m for name, m in model.named_modules() if isinstance(m, ExpertWeights)}
        g, u, d = model.expert_proj_names
        self.proj = {g: "gate", u: "up", d: "down"}
        self.filled: set[str] = set()
        self.expert_filled: set[tuple[str, int, str]] = set()

    def load(self, name: str, tensor: torch.Tensor, where: Path) -> None:
        if (m := _EXPERT.match(name)) and m["prefix"] in self.experts and m["proj"] in self.proj:
            e, proj = int(m["e"]), self.proj[m["proj"]]
            module = self.experts[m["prefix"]]
            if e >= module.num_experts:
                raise CheckpointError(f"{where}: tensor {name}: expert {e} but the model has {module.num_experts}")
            try:
                module.load_expert(e, proj, tensor)
            except ValueError as err:
                raise CheckpointError(f"{where}: tensor {name}: {err}") from err
            self.expert_filled.add((m["prefix"], e, proj))
            return
        if (m := _FUSED.match(name)) and m["prefix"] in self.experts:
            param_name = f"{m['prefix']}.{'w13' if m['proj'] == 'gate_up_proj' else 'w2'}"
            self._copy(param_name, name, tensor, where)
            module = self.experts[m["prefix"]]
            projs = ("gate", "up") if m["proj"] == "gate_up_proj" else ("down",)
            self.expert_filled.update((m["prefix"], e, p) for e in range(module.num_experts) for p in projs)
            return
        self._copy(name, name, tensor, where)

    def _copy(self, param_name: str, name: str, tensor: torch.Tensor, where: Path) -> None:
        param = self.params.get(param_name)
        if param is None:
            raise CheckpointError(f"{where}: tensor {name} has no place in {type(self.model).__name__}")
        if tuple(param.shape) != tuple(tensor.shape):
            raise CheckpointError(f"{where}: tensor {name}: shape {tuple(tensor.shape)}, "
                                  f"model expects {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensor)
        self.filled.add(param_name)

    def check_complete(self, path: Path) -> None:
        for prefix, module in self.experts.items():
            for e in range(module.num_experts):
                for proj, hf in zip(("gate", "up", "down"), self.model.expert_proj_names):
                    if (prefix, e, proj) not in self.expert_filled:
                        raise CheckpointError(f"{path}: missing tensor {prefix}.{e}.{hf}.weight")
        expert_params = {f"{p}.{w}" for p in self.experts for w in ("w13", "w2")}
        tied = {"lm_head.weight"} if self.model.spec.tie_word_embeddings else set()
        missing = set(self.params) - self.filled - expert_params - tied
        if missing:
            raise CheckpointError(f"{path}: missing tensor(s) {', '.join(sorted(missing)[:5])}"
                                  + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))


def _skip(name: str, spec: ModelSpec) -> bool:
    """Tensors a checkpoint may carry that inference does not use: rotary caches and extra layers
    (DeepSeek-V3's multi-token-prediction layer sits past num_hidden_layers)."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    m = _LAYER.match(name)
    return m is not None and int(m.group(1)) >= spec.num_layers


def load_weights(model: MoECausalLM, path: Path) -> None:
    """Every tensor of the checkpoint into the model. A checkpoint whose config.json has a quantization_config
    of a supported expert format (moelab.layers.moe.quant_load) keeps its experts quantized: their weights and
    scales go to QuantExpertLoader, which replaces w13/w2 and attaches the scales the MoE backends read."""
    from moelab.layers.moe.quant_load import QuantExpertLoader, quant_format

    device = next(model.parameters()).device
    targets = _Targets(model)
    fmt = quant_format(read_config(path))
    collector = QuantExpertLoader(targets.experts, model.expert_proj_names, fmt) if fmt else None
    for f, promised in shard_files(path).items():
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as sf:
                names = list(sf.keys())
                if promised is not None and (absent := set(promised) - set(names)):
                    raise CheckpointError(f"{f}: missing tensor {sorted(absent)[0]} (listed in the index)")
                for name in names:
                    if _skip(name, model.spec):
                        continue
                    tensor = sf.get_tensor(name)
                    if collector is None or not collector.claim(name, tensor):
                        targets.load(name, tensor, f)
        except SafetensorError as err:
            raise CheckpointError(f"{f}: cannot read safetensors file ({err})") from err
    if collector is not None:
        collector.finish()
        targets.expert_filled |= collector.filled
    targets.check_complete(Path(path))


def load_synthetic(config: dict, seed: int = 0, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu", moe_backend: str = "naive", top_k: int | None = None
                   ) -> MoECausalLM:
    """A model with the config's shapes and seeded random weights made directly on the device (no files):
    every tensor a checkpoint would hold is drawn with synthetic.init_tensor and loaded through the same
    name mapping as a checkpoint, one tensor at a time."""
    from moelab.checkpoint.layout import checkpoint_tensors
    from moelab.checkpoint.synthetic import init_tensor

    spec = spec_from_hf_config(config)
    model = build_model(spec, dtype, device, moe_backend, top_k)
    targets = _Targets(model)
    where = Path(f"<synthetic seed={seed}>")
    for t in checkpoint_tensors(spec):
        targets.load(t.name, init_tensor(t, seed, spec.num_layers, dtype, device), where)
    targets.check_complete(where)
    return model.eval()


def load_model(path: Path | str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               moe_backend: str = "naive", top_k: int | None = None) -> MoECausalLM:
    path = Path(path)
    spec = spec_from_hf_config(read_config(path))
    model = build_model(spec, dtype, device, moe_backend, top_k)
    load_weights(model, path)
    return model.eval()
