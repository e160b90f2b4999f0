"""LLMEngine: requests in, one scheduled step at a time, tokens and finished requests out.

Builds everything from an EngineConfig: the model (checkpoint directory or preset), the tokenizer, the KV
pool, the block manager, the scheduler, the runner and its CUDA graphs. `step()` is the whole loop body;
the offline API calls it until nothing is left, the server calls it from its engine thread.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from moelab.device import check_device, default_device
from moelab.engine.block_manager import BlockManager, KVCacheLeakError
from moelab.engine.config import EngineConfig
from moelab.engine.detokenizer import IncrementalDetokenizer
from moelab.engine.model_runner import ModelRunner
from moelab.engine.sampling_params import SamplingParams
from moelab.engine.scheduler import Scheduler
from moelab.engine.sequence import Sequence
from moelab.hf_config import eos_token_ids, spec_from_hf_config
from moelab.models.decoder import MoECausalLM

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Resolved:
    """What "auto" became on this machine."""

    device: str
    dtype: str
    moe_backend: str
    attention: str
    cuda_graphs: bool


def resolve(config: EngineConfig) -> Resolved:
    from moelab.layers.moe.backends import BACKENDS

    device = check_device(config.device) if config.device != "auto" else default_device()
    cuda = device.startswith("cuda")
    dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if cuda else "float32")
    backend = config.moe_backend
    if backend == "auto":
        backend = "triton" if cuda and "triton" in BACKENDS else "grouped"
    attention = config.attention if config.attention != "auto" else ("triton" if cuda else "sdpa")
    return Resolved(device, dtype, backend, attention, cuda and attention == "triton" and not config.enforce_eager)


def load_source(config: EngineConfig, r: Resolved) -> tuple[MoECausalLM, Tokenizer, dict]:
    """(model, tokenizer, HF config) from a checkpoint directory or a preset name."""
    from moelab.checkpoint.synthetic import synthetic_config
    from moelab.checkpoint.tokenizer import synthetic_tokenizer
    from moelab.models.loader import load_model, load_synthetic, read_config
    from moelab.presets import PRESETS

    path = Path(config.model)
    dtype = TORCH_DTYPES[r.dtype]
    if path.is_dir():
        if config.overrides:
            raise ValueError("overrides apply to presets only; a checkpoint directory has its own config.json")
        hf = read_config(path)
        model = load_model(path, dtype=dtype, device=r.device, moe_backend=r.moe_backend, top_k=config.top_k)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file}: missing; moelab needs the checkpoint's tokenizer.json")
        tokenizer = Tokenizer.from_file(str(tok_file))
    elif config.model in PRESETS:
        hf = synthetic_config(config.model, r.dtype, **config.overrides)
        model = load_synthetic(hf, seed=config.seed, dtype=dtype, device=r.device, moe_backend=r.moe_backend,
                               top_k=config.top_k)
        tokenizer = synthetic_tokenizer(hf["vocab_size"])
    else:
        raise ValueError(f"model {config.model!r} is neither a checkpoint directory nor a preset; presets: "
                         f"{', '.join(PRESETS)}")
    model.set_attention_impl(r.attention)
    return model, tokenizer, hf


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.resolved = r = resolve(config)
        torch.manual_seed(config.seed)
        t0 = time.perf_counter()
        self.model, self.tokenizer, self.hf_config = load_source(config, r)
        self.spec = spec_from_hf_config(self.hf_config)
        self.load_seconds = time.perf_counter() - t0
        self.max_model_len = config.max_model_len or min(self.spec.max_position_embeddings, 8192)
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < self.max_model_len:
            # EngineConfig checks this when max_model_len is given; here it is resolved (else a prompt longer
            # than the step budget would wait forever)
            raise ValueError(f"without chunked prefill max_num_batched_tokens ({config.max_num_batched_tokens}) "
                             f"must be >= max_model_len ({self.max_model_len})")
        from moelab.models.loader import read_generation_config

        path = Path(config.model)
        self._eos_ids = eos_token_ids(self.hf_config, read_generation_config(path) if path.is_dir() else None)
        if r.attention == "triton":
            self.model.prepare_fast_path(self.max_model_len)
        self.device = torch.device(r.device)
        run_cfg = config if r.cuda_graphs or config.enforce_eager else _eager(config)
        self.runner = ModelRunner(run_cfg, self.model, self.device, TORCH_DTYPES[r.dtype], self.max_model_len,
                                  self._eos_ids)
        self.num_blocks = self.runner.init_kv_cache()
        self.block_manager = BlockManager(self.num_blocks, config.block_size)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.enable_chunked_prefill)
        t1 = time.perf_counter()
        self.runner.warmup_prefill()
        self.runner.capture_graphs()
        self.graph_seconds = time.perf_counter() - t1
        if self.runner.recorder is not None:
            self.runner.recorder.reset()
        self.requests: dict[str, Sequence] = {}
        self._inflight = None  # the launched step not settled yet (overlapped steps)
        self._ids = itertools.count()
        self.num_steps = 0
        self.num_nonfinite = 0  # requests ended because their logits were not finite

    # ----- requests -----
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    arrival_time: float | None = None) -> Sequence:
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty; a request needs at least one token")
        if n >= self.max_model_len:
            raise ValueError(f"the prompt has {n} tokens; max_model_len is {self.max_model_len}, so it may have "
                             f"at most {self.max_model_len - 1} (one token is left for the output)")
        V = self.spec.vocab_size
        if any(not 0 <= t < V for t in prompt_token_ids):
            bad = next(t for t in prompt_token_ids if not 0 <= t < V)
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {V})")
        room = self.max_model_len - n
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        seq = Sequence(request_id, list(prompt_token_ids), params, max_tokens)
        if arrival_time is not None:
            seq.arrival_time = arrival_time
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort_request(self, request_id: str) -> bool:
        """Finish the request with reason "abort" and free its KV blocks; False when it is unknown or done."""
        seq = self.requests.pop(request_id, None)
        if seq is None or seq.finished:
            return False
        seq.finish("abort")
        self.scheduler.finish(seq)
        self.runner.forget(seq)
        self._check_idle()
        return True

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The ids that end a sequence (finish_reason "stop", stop_reason None) unless a request ignores EOS:
        config.json's eos_token_id and generation_config.json's, in that order."""
        return self._eos_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids: tuple[int, ...] | list[int]) -> None:
        self._eos_ids = self.runner.eos_token_ids = tuple(ids)

    @property
    def eos_token_id(self) -> int | None:
        """The first of eos_token_ids (the model's own), None when it has none."""
        return self._eos_ids[0] if self._eos_ids else None

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    # ----- the loop body -----
    def step(self) -> list[tuple[Sequence, list[int]]]:
        """Plan and launch one step; returns (sequence, tokens that reached the host) for every sequence that got
        a token. Finished sequences are released before returning.

        With overlapped steps (config.async_scheduling) the step launched here runs on the device while the host
        settles the previous one (tokens, stop checks, outputs) and returns its tokens: outputs lag one call,
        and a sequence that stopped (EOS, stop string) computes one token that is dropped. Before a step that
        might preempt, the previous step is settled first, so no preempted sequence has a token in flight."""
        out: list[tuple[Sequence, list[int]]] = []
        if self._inflight is not None and self.scheduler.may_preempt():
            out += self._settle(self._inflight)
            self._inflight = None
        batch = self.scheduler.schedule()
        launched = None
        if len(batch):
            now = time.perf_counter()
            for seq in batch.seqs:
                if seq.first_scheduled_time is None:
                    seq.first_scheduled_time = now
            launched = self.runner.launch(batch, self._inflight)
            self.num_steps += 1
            for seq, n in zip(batch.seqs, batch.num_tokens):
                seq.num_computed_tokens += n
            for i in launched.sampling:
                batch.seqs[i].pending += 1
        if self._inflight is not None:
            out += self._settle(self._inflight)
        self._inflight = launched
        if launched is not None and not self.config.async_scheduling:
            out += self._settle(launched)
            self._inflight = None
        self._check_idle()
        return out

    def _check_idle(self) -> None:
        """Idle (nothing waiting, running or in flight): no KV block may be held and no request tracked."""
        if self.has_unfinished_requests():
            return
        self.scheduler.bm.check_idle()
        if self.runner.seq_generators:
            raise KVCacheLeakError(f"the engine is idle but holds {len(self.runner.seq_generators)} per-request "
                                   "random generators")
        if self.requests:
            raise KVCacheLeakError(f"the engine is idle but tracks {len(self.requests)} requests "
                                   f"(e.g. {list(self.requests)[:4]}) that no longer run")

    def _settle(self, flight) -> list[tuple[Sequence, list[int]]]:
        """Wait for a launched step and apply its tokens."""
        tokens = self.runner.collect(flight)
        t = time.perf_counter()
        out = []
        for seq, tok in zip(flight.batch.seqs, tokens):
            if tok is None:
                continue
            seq.pending -= 1
            if seq.finished:  # stopped (or aborted) while this token was in flight: drop it
                continue
            if tok < 0:  # the sampler found NaN or infinite logits: this request ends with an error, the rest go on
                self.num_nonfinite += 1
                seq.finish("error", "non-finite logits")
                out.append((seq, []))
                self._release(seq)
                continue
            seq.token_ids.append(tok)
            seq.token_times.append(t)
            self._check_stop(seq, tok)
            out.append((seq, [tok]))
            if seq.finished:
                self._release(seq)
        return out

    def _release(self, seq: Sequence) -> None:
        """A finished sequence leaves the scheduler (its KV blocks freed), the runner and the request table."""
        self.scheduler.finish(seq)
        self.runner.forget(seq)
        self.requests.pop(seq.request_id, None)

    def _check_stop(self, seq: Sequence, tok: int) -> None:
        p = seq.params
        n_out = len(seq.token_ids) - len(seq.prompt_token_ids)  # settled tokens (one may still be in flight)
        if p.stop:  # the output's text, extended by this token (O(a few tokens), not a decode of the whole output)
            if seq.detok is None:
                seq.detok = IncrementalDetokenizer(self.tokenizer)
            seq.detok.push(seq.token_ids[len(seq.prompt_token_ids) + len(seq.detok.ids):])
        if n_out >= p.min_tokens:
            if not p.ignore_eos and tok in self.eos_token_ids:
                return seq.finish("stop", None)  # EOS: stop_reason None (vLLM's), a stop_token_ids hit: its id
            if tok in p.stop_token_ids:
                return seq.finish("stop", tok)
        if p.stop:
            # A stop string counts only where it ends in the text of output token min_tokens + 1 or later (vLLM's
            # rule): the text of the first min_tokens tokens is marked searched without a search. What was
            # searched held no stop string, so only one that ends in the new text can be there, and the search
            # starts (longest stop - 1) characters before it. The text searched is the whole decode, including
            # what the detokenizer holds back (a token can complete a stop string and start a multi-byte
            # character); only the emitted part counts as searched
            text = seq.detok.text + seq.detok.held
            start = max(0, seq.stop_searched - max(len(s) for s in p.stop) + 1)
            seq.stop_searched = len(seq.detok.text)
            if n_out > p.min_tokens:
                hits = [(at, s) for s in p.stop if (at := text.find(s, start)) >= 0]
                if hits:
                    at, s = min(hits)
                    seq.text = text[:at]
                    return seq.finish("stop", s)
        if n_out >= seq.max_tokens or len(seq.token_ids) >= self.max_model_len:
            seq.finish("length")

    def output_text(self, seq: Sequence) -> str:
        if seq.finish_reason == "stop" and isinstance(seq.stop_reason, str):
            return seq.text
        return self.tokenizer.decode(seq.output_token_ids)

    # ----- what the lab reads (its public surface besides spec, resolved, max_model_len and stats) -----
    @property
    def routing_recorder(self):
        """The routing recorder (moelab.engine.routing_recorder) when built with record_routing=True, else None."""
        return self.runner.recorder

    @property
    def top_k(self) -> int:
        """Experts per token in effect (the config's top-k override, else the model's)."""
        return self.spec.top_k if self.config.top_k is None else self.config.top_k

    def moe_layer_ids(self) -> list[int]:
        """Decoder layer indices whose FFN is a routed-expert block, in order (the recorder's layer axis)."""
        from moelab.layers.moe.layer import SparseMoE

        return [i for i, layer in enumerate(self.model.model.layers) if isinstance(layer.ffn, SparseMoE)]

    def stats(self) -> dict[str, float]:
        return {"num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting),
                "kv_cache_usage": self.block_manager.usage, "num_preemptions": self.scheduler.num_preemptions,
                "num_blocks": self.num_blocks, "num_steps": self.num_steps, "num_nonfinite": self.num_nonfinite}


def _eager(config: EngineConfig) -> EngineConfig:
    from dataclasses import replace

    return replace(config, enforce_eager=True)
