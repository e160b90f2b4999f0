"""The offline API, shaped like vLLM's: LLM(model, ...).generate(prompts, SamplingParams(...)).

    from moelab import LLM, SamplingParams
    llm = LLM("olmoe-1b-7b", overrides={"layers": 2})          # a preset: synthetic weights on the device
    out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
    out[0].outputs[0].text, out[0].metrics.ttft

Prompts are strings (tokenized without special tokens) or lists of token ids. Outputs come back in the
order of the prompts, each with its timestamps (see moelab.engine.outputs).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

from moelab.engine.config import EngineConfig
from moelab.engine.llm_engine import LLMEngine
from moelab.engine.outputs import RequestOutput
from moelab.engine.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str, **kwargs: Any) -> None:
        self.config = EngineConfig(model=str(model), **kwargs)
        self.engine = LLMEngine(self.config)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None
                 = None, progress: bool = False) -> list[RequestOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) \
            else list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        texts: list[str | None] = []
        ids: list[list[int]] = []
        for p in prompts:
            if isinstance(p, str):
                texts.append(p)
                ids.append(self.tokenizer.encode(p).ids)  # with the tokenizer's special tokens (a BOS), as vLLM
            elif isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p):
                texts.append(None)
                ids.append(list(p))
            else:
                raise TypeError(f"a prompt is a string or a list of token ids, got {type(p).__name__}")
        engine = self.engine
        # validate everything before queueing anything, so a bad prompt loses nothing
        for i, toks in enumerate(ids):
            if not toks:
                raise ValueError(f"prompt {i} is empty")
            if len(toks) >= engine.max_model_len:
                raise ValueError(f"prompt {i} has {len(toks)} tokens; max_model_len is {engine.max_model_len}")
        base = f"gen{engine.num_steps}-"
        seqs = [engine.add_request(toks, p, request_id=f"{base}{i}") for i, (toks, p) in enumerate(zip(ids, params))]
        bar = _progress(len(seqs)) if progress else None
        done = 0
        while engine.has_unfinished_requests():
            for seq, _ in engine.step():
                if seq.finished and bar is not None:
                    done += 1
                    bar(done)
        return [RequestOutput.from_seq(s, t, engine.output_text(s)) for s, t in zip(seqs, texts)]


def _progress(total: int):
    try:
        from rich.progress import Progress
    except ImportError:
        return None
    prog = Progress(transient=True)
    prog.start()
    task = prog.add_task("generate", total=total)

    def update(done: int) -> None:
        prog.update(task, completed=done)
        if done >= total:
            prog.stop()

    return update
