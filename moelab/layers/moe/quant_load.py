"""Quantized experts in checkpoints: write a quantized copy of an HF checkpoint directory, and collect the
quantized expert tensors of one while it is loaded.

Only the routed experts' projections (`...experts.{e}.{proj}.weight`) are quantized; everything else is copied
unchanged. Per expert tensor W [N, K] the copy holds Q (fp8 e4m3fn or int8) and its float32 scale (W ~= Q * S):
`{proj}.weight_scale` ([1] per tensor, [N] per channel) or, for 128x128 blocks, `{proj}.weight_scale_inv`
([ceil(N/128), ceil(K/128)], DeepSeek-V3's name). config.json gains a `quantization_config`:
fp8 formats in the style of HF's fine-grained fp8 (`quant_method: "fp8"`, `activation_scheme: "dynamic"`,
`weight_block_size: [128, 128]` for blocks, `modules_to_not_convert` listing the linear layers left alone),
int8 as `quant_method: "moelab"` (no HF-native layout); both carry `moelab_format` (a QuantFormat).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from moelab.layers.moe.layer import ExpertWeights
from moelab.layers.moe.quant import FP8_DTYPE, FP8_MAX, QuantFormat, QuantScales, check_format, is_w8a8, qdtype
from moelab.layers.moe.quant import quantize_weight as _quantize

_EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<e>\d+)\.(?P<proj>\w+)\.(?P<kind>weight|weight_scale|"
                     r"weight_scale_inv)$")


def quantization_config(fmt: QuantFormat, not_converted: list[str]) -> dict:
    check_format(fmt)
    if not is_w8a8(fmt):
        return {"quant_method": "moelab", "moelab_format": fmt, "bits": 8, "symmetric": True,
                "activation_scheme": "none", "modules_to_not_convert": not_converted}
    cfg = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "moelab_format": fmt,
           "modules_to_not_convert": not_converted}
    if fmt == "fp8_block":
        cfg["weight_block_size"] = [128, 128]
    return cfg


def quant_format(config: dict) -> QuantFormat | None:
    """The QuantFormat of an HF config.json (None when it is not quantized); ValueError for one moelab cannot run."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    fmt = qc.get("moelab_format")
    if fmt is None and qc.get("quant_method") == "fp8":  # a foreign fp8 checkpoint: blocks or per tensor
        fmt = "fp8_block" if qc.get("weight_block_size") else "fp8_tensor"
        if qc.get("weight_block_size") not in (None, [128, 128]):
            raise ValueError(f"fp8 weight_block_size {qc['weight_block_size']}: only [128, 128] is supported")
    if fmt is None:
        raise ValueError(f"quantization_config {qc.get('quant_method')!r}: not a format moelab runs")
    check_format(fmt)
    return fmt


def _scale_name(fmt: str) -> str:
    return "weight_scale_inv" if fmt == "fp8_block" else "weight_scale"


def quantize_checkpoint(src: Path | str, dst: Path | str, fmt: QuantFormat, expert_projs: tuple[str, ...] | None = None
                        ) -> Path:
    """Write dst: a copy of the HF checkpoint src with every routed expert's weights in format fmt (one output
    shard per input shard, same names; an index is rewritten). expert_projs: projection names to quantize
    (default: any `...experts.{e}.{proj}.weight`). Returns dst."""
    check_format(fmt)
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise ValueError(f"{src}: not a checkpoint directory (no config.json)")
    dst.mkdir(parents=True, exist_ok=True)
    weight_map, not_converted = {}, set()
    for f in sorted(src.glob("*.safetensors")):
        out: dict[str, torch.Tensor] = {}
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                t = sf.get_tensor(name)
                m = _EXPERT.match(name)
                if m and m["kind"] == "weight" and (expert_projs is None or m["proj"] in expert_projs):
                    q, s = _quantize(t[None], fmt)
                    out[name] = q[0].contiguous()
                    out[name.removesuffix("weight") + _scale_name(fmt)] = s.reshape(s.shape[1:] or (1,)).contiguous()
                else:
                    out[name] = t.contiguous()
                    if name.endswith(".weight") and t.dim() == 2 and "embed" not in name:
                        not_converted.add(name.removesuffix(".weight"))
        save_file(out, str(dst / f.name), metadata={"format": "pt"})
        weight_map.update({n: f.name for n in out})
    if (src / "model.safetensors.index.json").is_file():
        (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                     indent=1))
    for f in src.iterdir():  # tokenizer, generation config, ...
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json",
                                                                          "model.safetensors.index.json"):
            shutil.copy2(f, dst / f.name)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config(fmt, sorted(not_converted))
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


class QuantExpertLoader:
    """Collects the quantized expert tensors of a checkpoint (weights and scales, in any order) and installs them
    on the model's ExpertWeights: w13 / w2 become the fp8 / int8 tensors and `module.scales` a QuantScales.

    experts: {module prefix: ExpertWeights} as the loader finds them; proj_names: the family's (gate, up,
    down) checkpoint names. `claim(name, tensor)` takes the expert tensors and returns True for them; `filled`
    holds (prefix, expert, "gate"|"up"|"down") of the weights claimed; `finish()` installs everything."""

    def __init__(self, experts: dict[str, ExpertWeights], proj_names: tuple[str, str, str], fmt: QuantFormat
                 ) -> None:
        check_format(fmt)
        self.experts, self.fmt = experts, fmt
        self.proj = dict(zip(proj_names, ("gate", "up", "down")))
        self.weights: dict[tuple[str, int, str], torch.Tensor] = {}
        self.scales: dict[tuple[str, int, str], torch.Tensor] = {}
        self.filled: set[tuple[str, int, str]] = set()

    def claim(self, name: str, tensor: torch.Tensor) -> bool:
        m = _EXPERT.match(name)
        if not m or m["prefix"] not in self.experts or m["proj"] not in self.proj:
            return False
        key = (m["prefix"], int(m["e"]), self.proj[m["proj"]])
        if m["kind"] == "weight":
            if tensor.dtype != qdtype(self.fmt):
                raise ValueError(f"tensor {name}: {tensor.dtype}, but the checkpoint says {self.fmt} "
                                 f"({qdtype(self.fmt)})")
            self.weights[key] = tensor
            self.filled.add(key)
        else:
            self.scales[key] = tensor.float()
        return True

    def _scale(self, key: tuple[str, int, str], rows: int) -> torch.Tensor:
        """The scale of one expert tensor: [] per tensor, [rows] per channel, [rows/128, K/128] per block."""
        if key not in self.scales:
            raise ValueError(f"missing {key[0]}.{key[1]} {key[2]} {_scale_name(self.fmt)}")
        s = self.scales[key]
        return s.reshape(()) if self.fmt == "fp8_tensor" else s if self.fmt == "fp8_block" else s.reshape(rows)

    def _stack(self, prefix: str, module: ExpertWeights) -> tuple[torch.Tensor, torch.Tensor, QuantScales]:
        q13, q2, s13, s2 = [], [], [], []
        for e in range(module.num_experts):
            (g, sg), (u, su), (d, sd) = ((self.weights[(prefix, e, p)], self._scale(
                (prefix, e, p), self.weights[(prefix, e, p)].shape[0])) for p in ("gate", "up", "down"))
            if self.fmt == "fp8_tensor":  # one scale per w13: requantize gate and up to the larger one
                s = torch.maximum(sg, su)
                g, u = ((w.float() * (sw / s)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE) for w, sw in ((g, sg), (u, su)))
                s13.append(s)
            else:
                s13.append(torch.cat([sg, su]))
            q13.append(torch.cat([g, u]))
            q2.append(d)
            s2.append(sd)
        return torch.stack(q13), torch.stack(q2), QuantScales(self.fmt, torch.stack(s13), torch.stack(s2))

    @torch.no_grad()
    def finish(self) -> None:
        """Install the stacked quantized weights and scales on every ExpertWeights (on its device)."""
        for prefix, module in self.experts.items():
            missing = [(e, p) for e in range(module.num_experts) for p in ("gate", "up", "down")
                       if (prefix, e, p) not in self.weights]
            if missing:
                raise ValueError(f"missing quantized tensor {prefix}.{missing[0][0]} {missing[0][1]}")
            q13, q2, scales = self._stack(prefix, module)
            dev = module.w13.device
            scales = QuantScales(self.fmt, scales.w13_scale.to(dev), scales.w2_scale.to(dev))
            module.w13 = nn.Parameter(q13.to(dev), requires_grad=False)
            module.w2 = nn.Parameter(q2.to(dev), requires_grad=False)
            scales.check(module.w13, module.w2)
            module.scales = scales
        self.weights.clear()
        self.scales.clear()
