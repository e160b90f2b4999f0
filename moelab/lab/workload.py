"""Workloads: the prompts and output lengths of one benchmark point, reproducible from a seed.

Three kinds:

- fixed: every request has input_len random token ids and output_len output tokens.
- random: lengths drawn per request, vLLM's random dataset rule (range ratio r in [0, 1)):
  input ~ U{floor(L(1-r)) .. ceil(L(1+r))} and output ~ U{floor(O(1-r)) .. ceil(O(1+r))}, both at least 1;
  r = 0 is the fixed workload.
- file: a text file, one prompt per non-empty line, tokenized by the model's tokenizer; the first `batch`
  lines are used (cycled when the file has fewer); output lengths as fixed/random above.

Token ids are uniform over [3, vocab) minus the EOS id (0-2 are usually special tokens), from
numpy.random.default_rng(seed), so a point's prompts are the same on every machine and every trial.
Outputs ignore EOS, so each request generates exactly its output length.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

Kind = Literal["fixed", "random", "file"]
KINDS = ("fixed", "random", "file")


@dataclass(frozen=True)
class Workload:
    """One benchmark point's requests. input_len is ignored for kind "file" (the lines decide)."""

    batch: int = 1
    input_len: int = 128
    output_len: int = 128
    kind: Kind = "fixed"
    range_ratio: float = 0.0
    path: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.kind in KINDS, f"workload kind {self.kind!r}; allowed: {', '.join(KINDS)}"),
            (isinstance(self.batch, int) and self.batch >= 1, f"batch must be an integer >= 1, got {self.batch!r}"),
            (isinstance(self.input_len, int) and self.input_len >= 1,
             f"input_len must be an integer >= 1, got {self.input_len!r}"),
            (isinstance(self.output_len, int) and self.output_len >= 1,
             f"output_len must be an integer >= 1, got {self.output_len!r}"),
            (0.0 <= self.range_ratio < 1.0, f"range_ratio must be in [0, 1), got {self.range_ratio!r}"),
            (self.kind != "file" or self.path, "a file workload needs a path (--prompts FILE)"),
            # what a run measures must be what it stores: no setting that its kind would silently drop
            (self.kind != "fixed" or self.range_ratio == 0,
             f"a fixed workload has exact lengths: range_ratio {self.range_ratio} needs the random (or file) kind"),
            (self.kind == "file" or self.path is None,
             f"prompts from a file ({self.path!r}) need the file kind, not {self.kind!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.kind == "file" and not Path(self.path).is_file():
            raise ValueError(f"prompt file {self.path!r} does not exist")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.kind != "file":
            d.pop("path")
        if self.kind == "fixed":
            d.pop("range_ratio")
        return d

    @property
    def max_total_len(self) -> int:
        """The longest input + output a request of this workload can have (file: unknown until tokenized)."""
        hi = lambda n: math.ceil(n * (1 + self.range_ratio)) if self.kind != "fixed" else n  # noqa: E731
        return hi(self.input_len) + hi(self.output_len)


def length_range(n: int, r: float) -> tuple[int, int]:
    """The inclusive range of vLLM's random dataset: [max(1, floor(n(1-r))), max(1, ceil(n(1+r)))]."""
    return max(1, math.floor(n * (1 - r))), max(1, math.ceil(n * (1 + r)))


def draw_lengths(n: int, count: int, r: float, rng: np.random.Generator) -> list[int]:
    if r == 0:
        return [n] * count
    lo, hi = length_range(n, r)
    return rng.integers(lo, hi + 1, size=count).tolist()


def random_ids(length: int, vocab_size: int, rng: np.random.Generator, avoid: set[int]) -> list[int]:
    if vocab_size <= 4:
        raise ValueError(f"vocab_size {vocab_size} leaves no ordinary token ids")
    ids = rng.integers(3, vocab_size, size=length)
    for bad in avoid:  # remap the few special ids deterministically
        ids[ids == bad] = 3 if bad != 3 else 4
    return ids.tolist()


def read_prompt_file(path: str | Path) -> list[str]:
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise ValueError(f"prompt file {str(path)!r} has no non-empty line")
    return lines


def make_requests(wl: Workload, vocab_size: int, eos_token_id: int | None = None, tokenizer: Any = None,
                  max_model_len: int | None = None) -> tuple[list[list[int]], list[int]]:
    """(prompt token ids, output lengths) of every request, deterministic in wl.seed.

    File prompts longer than max_model_len - output_len - 1 tokens are cut to fit (the cut is kept, not
    dropped, so the batch size holds).
    """
    rng = np.random.default_rng(wl.seed)
    out_lens = draw_lengths(wl.output_len, wl.batch, wl.range_ratio, rng)
    avoid = {eos_token_id} if eos_token_id is not None else set()
    if wl.kind == "file":
        if tokenizer is None:
            raise ValueError("a file workload needs the model's tokenizer")
        lines = read_prompt_file(wl.path)
        prompts = []
        for i in range(wl.batch):
            ids = tokenizer.encode(lines[i % len(lines)], add_special_tokens=False).ids or [3]
            if max_model_len is not None:
                ids = ids[: max(1, max_model_len - out_lens[i] - 1)]
            prompts.append(list(ids))
        return prompts, out_lens
    in_lens = draw_lengths(wl.input_len, wl.batch, wl.range_ratio, rng)
    return [random_ids(n, vocab_size, rng, avoid) for n in in_lens], out_lens
