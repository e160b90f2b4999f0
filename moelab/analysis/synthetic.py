"""Synthetic routing baselines (uniform, Zipf, hot-set), labelled as such in the RoutingTrace's source.

Each layer draws a popularity p over the E experts, then every token takes K distinct experts by sampling
without replacement with probabilities p (Gumbel top-k: the K largest log p_e + Gumbel noise). Expert identities
are shuffled per layer (shuffle=True), so the hot experts are not the low ids: a contiguous hot block would make
round-robin placement look balanced by accident (the seed repo's mistake, reference/seed_repo.md section 1.8).

- uniform:  p_e = 1/E
- zipf:     p_e proportional to r_e^-s, r_e = 1..E the expert's popularity rank, s > 0 the exponent
- hotset:   H = max(1, round(hot_fraction * E)) hot experts share hot_share of p (each hot_share / H), the others
            share the rest. Without replacement a token takes each expert at most once, so when H is close to
            K the hot experts' realized traffic share is below hot_share (every token already holds them).
Router weights are p of the chosen experts renormalized over the K (a stand-in; real weights come from the
engine).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from moelab.analysis.balance import layer_table
from moelab.analysis.trace import RoutingTrace
from moelab.spec import ModelSpec

SUMMARY_COLUMNS = ["max/mean", "step max/mean", "cv", "gini", "entropy", "hot", "cold", "top share", "drift"]

KINDS = ("uniform", "zipf", "hotset")


def popularity(kind: str, num_experts: int, *, s: float = 1.2, hot_fraction: float = 0.125,
               hot_share: float = 0.5) -> np.ndarray:
    """p [E] (sums to 1), in rank order (expert 0 the most popular) before any shuffle."""
    E = num_experts
    if kind == "uniform":
        return np.full(E, 1.0 / E)
    if kind == "zipf":
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"zipf exponent s must be a finite number > 0, got {s}")
        p = np.arange(1, E + 1, dtype=np.float64) ** -s
        return p / p.sum()
    if kind == "hotset":
        if not 0 < hot_fraction < 1 or not 0 < hot_share < 1:
            raise ValueError(f"hotset needs 0 < hot_fraction < 1 and 0 < hot_share < 1, got {hot_fraction}, "
                             f"{hot_share}")
        H = min(E - 1, max(1, round(hot_fraction * E)))
        return np.concatenate([np.full(H, hot_share / H), np.full(E - H, (1 - hot_share) / (E - H))])
    raise ValueError(f"synthetic routing kind {kind!r}; allowed: {', '.join(KINDS)}")


def sample_topk(p: np.ndarray, tokens: int, top_k: int, rng: np.random.Generator) -> np.ndarray:
    """[tokens, K] distinct experts per token, sampled without replacement with probabilities p (Gumbel top-k)."""
    keys = np.log(np.maximum(p, 1e-300))[None, :] + rng.gumbel(size=(tokens, len(p)))
    top = np.argpartition(-keys, top_k - 1, axis=1)[:, :top_k]
    order = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def synthetic_trace(kind: str, num_experts: int, top_k: int, *, layers: int = 1, steps: int = 8,
                    tokens_per_step: int = 256, s: float = 1.2, hot_fraction: float = 0.125, hot_share: float = 0.5,
                    seed: int = 0, shuffle: bool = True, keep_ids: bool = True, model: str = "",
                    layer_ids: Any = None, spec_fields: dict | None = None,
                    step_tokens: Any = None) -> RoutingTrace:
    """A RoutingTrace of `steps` steps of `tokens_per_step` tokens through `layers` MoE layers, source
    "synthetic-<kind>"; its provenance records every parameter and the seed. step_tokens: the tokens of each step
    instead (a real trace's: one large prefill step and many small decode steps), `steps` of them."""
    if step_tokens is not None:
        step_tokens = np.asarray(step_tokens, dtype=np.int64)
        if step_tokens.ndim != 1 or len(step_tokens) != steps or (step_tokens < 0).any():
            raise ValueError(f"step_tokens must be {steps} counts >= 0, got shape {step_tokens.shape}")
    if top_k > num_experts or min(top_k, layers, steps) < 1 or tokens_per_step < 0:
        raise ValueError(f"need 1 <= top_k <= experts and layers, steps >= 1: got top_k {top_k}, experts "
                         f"{num_experts}, layers {layers}, steps {steps}, tokens {tokens_per_step}")
    rng = np.random.default_rng(seed)
    base = popularity(kind, num_experts, s=s, hot_fraction=hot_fraction, hot_share=hot_share)
    tokens = step_tokens if step_tokens is not None else np.full(steps, tokens_per_step)
    N = int(tokens.sum())
    ids = np.empty((N, layers, top_k), dtype=np.int32)
    weights = np.empty((N, layers, top_k), dtype=np.float32)
    for layer in range(layers):
        p = base[rng.permutation(num_experts)] if shuffle else base
        ids[:, layer] = sample_topk(p, N, top_k, rng)
        w = p[ids[:, layer]]
        weights[:, layer] = w / w.sum(axis=1, keepdims=True)
    params = dict(kind=kind, s=s, hot_fraction=hot_fraction, hot_share=hot_share, seed=seed, shuffle=shuffle)
    unused = {"uniform": {"s", "hot_fraction", "hot_share"}, "zipf": {"hot_fraction", "hot_share"}, "hotset": {"s"}}
    meta = dict(source=f"synthetic-{kind}", model=model, layer_ids=layer_ids, spec_fields=spec_fields,
                workload=dict(steps=steps, tokens_per_step=tokens_per_step if step_tokens is None else
                              "as the real trace's steps", tokens=N),
                provenance={"generator": "moelab.analysis.synthetic",
                            **{k: v for k, v in params.items() if k not in unused[kind]}})
    trace = RoutingTrace.from_topk(ids, tokens, num_experts, topk_weights=weights, **meta)
    if keep_ids:
        return trace
    return RoutingTrace.from_counts(trace.counts, top_k, tokens=trace.tokens, **meta)


def parse_baseline(text: str) -> tuple[str, dict[str, float]]:
    """'uniform' | 'zipf:S' | 'hotset:FRACTION:SHARE' -> (kind, keyword arguments of synthetic_trace)."""
    kind, *args = text.lower().split(":")
    try:
        vals = [float(a) for a in args]
    except ValueError:
        raise ValueError(f"baseline {text!r}: parameters must be numbers") from None
    if kind == "uniform" and not vals:
        return kind, {}
    if kind == "zipf" and len(vals) <= 1:
        return kind, {"s": vals[0]} if vals else {}
    if kind == "hotset" and len(vals) <= 2:
        return kind, dict(zip(("hot_fraction", "hot_share"), vals))
    raise ValueError(f"baseline {text!r}; allowed: uniform, zipf[:S], hotset[:FRACTION[:SHARE]]")


def synthetic_like(trace_or_spec: RoutingTrace | ModelSpec, kind: str, *, steps: int | None = None,
                   tokens_per_step: int | None = None, seed: int = 0, **params: Any) -> RoutingTrace:
    """A synthetic baseline with the experts, top-k and layers of a real trace (and, unless steps or
    tokens_per_step say otherwise, its steps with their own token counts, so per-step metrics compare like with
    like) or of a ModelSpec (every MoE layer)."""
    if isinstance(trace_or_spec, RoutingTrace):
        t = trace_or_spec
        if t.num_steps == 0:
            raise ValueError("the trace has no step: nothing to build a baseline like")
        own = steps is None and tokens_per_step is None
        return synthetic_trace(kind, t.num_experts, t.top_k, layers=t.num_layers, steps=steps or t.num_steps,
                               tokens_per_step=tokens_per_step or max(1, round(t.num_tokens / t.num_steps)),
                               seed=seed, model=t.model, layer_ids=t.layer_ids, spec_fields=t.spec_fields,
                               keep_ids=t.has_token_ids, step_tokens=np.asarray(t.tokens) if own else None,
                               **params)
    spec = trace_or_spec
    layer_ids = [i for i in range(spec.num_layers) if spec.is_moe_layer(i)]
    fields = dict(hidden_size=spec.hidden_size, moe_intermediate_size=spec.moe_intermediate_size)
    return synthetic_trace(kind, spec.num_experts, spec.top_k, layers=len(layer_ids), steps=steps or 8,
                           tokens_per_step=tokens_per_step or 256, seed=seed, layer_ids=layer_ids,
                           spec_fields=fields, **params)


def baseline_summary(trace: RoutingTrace, baselines: list[str], seed: int = 0) -> pd.DataFrame:
    """The "all layers" row of layer_table for the trace and for each baseline ('zipf:1.2', ...) made with
    synthetic_like(trace, ...): same experts, top-k, layers, steps and tokens. One row per routing."""
    rows = {"trace": layer_table(trace).iloc[-2]}
    for b in baselines:
        kind, params = parse_baseline(b)
        rows[f"baseline {b}"] = layer_table(synthetic_like(trace, kind, seed=seed, **params)).iloc[-2]
    return pd.DataFrame(rows).T[SUMMARY_COLUMNS].reset_index(names="routing")
