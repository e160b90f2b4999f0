"""Each family against transformers' own implementation on tiny random configs (float32, same weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY

from moelab.context import ForwardContext, forward_context
from moelab.models.loader import load_model

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def hf_model(path: Path) -> torch.nn.Module:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("name", list(TINY))
def test_logits_match_transformers(name: str, tiny_checkpoints: dict[str, Path]) -> None:
    path = tiny_checkpoints[name]
    hf, ours = hf_model(path), load_model(path)
    lengths = [9, 4, 13]  # mixed lengths in one varlen batch
    ids = [torch.randint(4, 320, (n,)) for n in lengths]
    with torch.no_grad(), forward_context(ForwardContext.for_prompts(lengths)):
        hidden = ours(torch.cat(ids), torch.cat([torch.arange(n) for n in lengths]))
        logits = ours.compute_logits(hidden).split(lengths)
    with torch.no_grad():
        for seq, out in zip(ids, logits):
            ref = hf(seq[None]).logits[0]
            assert torch.isfinite(out).all()
            assert rel_err(out, ref) < 1e-4, name
