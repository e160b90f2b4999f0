"""For each preset: write a full-width 2-layer synthetic checkpoint, load it in transformers and in moelab on
the GPU, run one 2048-token prompt, and compare logits (bf16 vs the float32 moelab reference, and moelab vs
transformers). Prints a table and writes JSON rows to --out.

    python scripts/check_presets_gpu.py --out results/ --presets olmoe-1b-7b deepseek-v3
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from moelab.checkpoint.synthetic import make_checkpoint
from moelab.context import ForwardContext, forward_context
from moelab.engine.reference_generate import generate_greedy
from moelab.models.loader import load_model
from moelab.presets import PRESETS


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def ours_logits(path: Path, dtype: torch.dtype, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    t = time.perf_counter()
    model = load_model(path, dtype=dtype, device="cuda")
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t
    n = ids.numel()
    with torch.no_grad(), forward_context(ForwardContext.for_prompts([n], "cuda")):
        logits = model.compute_logits(model(ids, torch.arange(n, device="cuda"))).float().cpu()
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return logits, load_s


def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor | None:
    try:
        import transformers
    except ImportError:
        return None
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        logits = model(ids[None]).logits[0].float().cpu()
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return logits


def check(preset: str, root: Path, seq: int) -> dict:
    path = root / preset
    t = time.perf_counter()
    info = make_checkpoint(preset, path, layers=2, dtype="bfloat16")
    make_s = time.perf_counter() - t
    ids = torch.randint(300, 512, (seq,), generator=torch.Generator().manual_seed(0)).cuda()
    hf = hf_logits(path, ids)
    bf16, load_s = ours_logits(path, torch.bfloat16, ids)
    fp32, _ = ours_logits(path, torch.float32, ids)
    model = load_model(path, dtype=torch.bfloat16, device="cuda")
    gens = generate_greedy(model, [ids[:7].tolist(), ids[:3].tolist()], max_new_tokens=8)
    del model
    shutil.rmtree(path)
    return dict(preset=preset, params_b=info.num_params / 1e9, shards=info.num_shards, make_s=make_s,
                load_s=load_s, seq=seq, finite=bool(torch.isfinite(bf16).all()), max_abs_logit=bf16.abs().max().item(),
                rel_bf16_vs_fp32=rel(bf16, fp32), rel_hf_bf16_vs_fp32=rel(hf, fp32) if hf is not None else None,
                rel_ours_vs_hf_bf16=rel(bf16, hf) if hf is not None else None,
                argmax_agree_fp32=(bf16.argmax(-1) == fp32.argmax(-1)).float().mean().item(),
                generated=[g.token_ids for g in gens])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="*", default=list(PRESETS))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(torch=torch.__version__, gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    print(env, flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for p in args.presets:
            row = check(p, Path(tmp), args.seq)
            rows.append(row)
            print({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            (args.out / "presets_gpu.json").write_text(json.dumps(dict(env=env, rows=rows), indent=1))
    print(f"\n{'preset':20s} {'params':>7s} {'make s':>7s} {'load s':>7s} {'max|l|':>7s} "
          f"{'bf16/fp32':>10s} {'hf/fp32':>10s} {'ours/hf':>10s} {'argmax':>7s}")
    for r in rows:
        print(f"{r['preset']:20s} {r['params_b']:7.2f} {r['make_s']:7.1f} {r['load_s']:7.1f} "
              f"{r['max_abs_logit']:7.2f} {r['rel_bf16_vs_fp32']:10.2e} {r['rel_hf_bf16_vs_fp32'] or 0:10.2e} "
              f"{r['rel_ours_vs_hf_bf16'] or 0:10.2e} {r['argmax_agree_fp32']:7.3f}")


if __name__ == "__main__":
    main()
