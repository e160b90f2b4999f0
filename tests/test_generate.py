"""Reference greedy generation through the paged KV cache equals transformers' generate, token for token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moelab.engine.reference_generate import generate_greedy
from moelab.models.loader import load_model

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


@pytest.mark.parametrize("name", ["mixtral-gqa", "olmoe", "qwen2-moe-dense-first", "qwen3-moe-gqa-norm",
                                  "deepseek-v2-lite", "deepseek-v3"])
def test_greedy_matches_transformers_generate(name: str, tiny_checkpoints: dict[str, Path]) -> None:
    path = tiny_checkpoints[name]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_model(path)
    prompts = [torch.randint(4, 320, (n,)).tolist() for n in (5, 17, 1)]  # mixed lengths, one batch
    gens = generate_greedy(ours, prompts, max_new_tokens=12, block_size=4)  # sequences span several blocks
    for prompt, gen in zip(prompts, gens):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=1, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert gen.token_ids == ref[0, len(prompt):].tolist(), name
        assert len(gen.token_times) == 12 and gen.token_times == sorted(gen.token_times)


def test_generation_stops_at_eos(tiny_checkpoints: dict[str, Path]) -> None:
    model = load_model(tiny_checkpoints["olmoe"])
    first = generate_greedy(model, [[5, 6, 7]], max_new_tokens=4)[0].token_ids
    gen = generate_greedy(model, [[5, 6, 7]], max_new_tokens=4, eos_token_id=first[1])[0]
    assert gen.token_ids == first[:2] and gen.finish_reason == "stop"


def test_empty_prompt_is_refused(tiny_checkpoints: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="at least one token"):
        generate_greedy(load_model(tiny_checkpoints["olmoe"]), [[]], max_new_tokens=2)
