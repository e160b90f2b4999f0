"""RoutingTrace: which experts the tokens of each step went to, per MoE layer, and its file format.

counts [S, L, E] int32 (tokens routed to each expert per step and MoE layer) is always there; each token's
top-k ids [N, L, K] and weights are optional (N = total tokens, step-major order). The engine's recorder fills
it through RoutingTrace.from_counts / from_topk; moelab.analysis.synthetic makes labelled baselines.

File: one compressed .npz (zip of .npy arrays) plus a JSON metadata entry. Chosen over Parquet because the data
are dense fixed-shape tensors: npz keeps each as one array (no long-form explosion to step/layer/expert rows),
loads with numpy alone and with allow_pickle=False (no code runs on load), and deflate shrinks the skewed counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SOURCES = ("engine", "synthetic-zipf", "synthetic-hotset", "synthetic-uniform")
FORMAT = "moelab-routing-trace"
VERSION = 1


def _fail(msg: str) -> None:
    raise ValueError(f"invalid RoutingTrace: {msg}")


@dataclass(frozen=True, eq=False)
class RoutingTrace:
    """Routing of S steps through L MoE layers of E experts with top-k K.

    counts[s, l, e]: tokens of step s whose top-k in MoE layer l contains expert e; every (s, l) sums to
    tokens[s] * K. layer_ids: the model's layer index of each of the L MoE layers. topk_ids / topk_weights
    [N, L, K]: per token (steps in order, N = tokens.sum()), or None. source: "engine" for real routing,
    "synthetic-*" for generated baselines. model: preset name or checkpoint; spec_fields: ModelSpec fields the
    simulator may need (hidden_size, moe_intermediate_size, ...); workload and provenance: free-form, stored as JSON.
    """

    counts: np.ndarray
    tokens: np.ndarray
    top_k: int
    source: str
    layer_ids: tuple[int, ...]
    model: str = ""
    spec_fields: dict[str, Any] = field(default_factory=dict)
    workload: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    topk_ids: np.ndarray | None = None
    topk_weights: np.ndarray | None = None

    def __post_init__(self) -> None:
        c, t = self.counts, self.tokens
        if c.ndim != 3 or c.dtype != np.int32:
            _fail(f"counts must be int32 [steps, layers, experts], got {c.dtype} {c.shape}")
        if (c < 0).any():
            _fail("counts must be >= 0")
        if t.shape != (c.shape[0],) or t.dtype != np.int64 or (t < 0).any():
            _fail(f"tokens must be int64 >= 0 of shape ({c.shape[0]},), got {t.dtype} {t.shape}")
        if not 1 <= self.top_k <= c.shape[2]:
            _fail(f"top_k {self.top_k} outside [1, {c.shape[2]} experts]")
        if self.source not in SOURCES:
            _fail(f"source {self.source!r}; allowed: {', '.join(SOURCES)}")
        if len(self.layer_ids) != c.shape[1] or len(set(self.layer_ids)) != len(self.layer_ids):
            _fail(f"layer_ids {self.layer_ids} must name each of the {c.shape[1]} layers once")
        sums = c.sum(axis=2, dtype=np.int64)
        bad = np.argwhere(sums != t[:, None] * self.top_k)
        if len(bad):
            s, l = bad[0]
            _fail(f"step {s} layer {l}: counts sum to {sums[s, l]}, expected tokens {t[s]} x top_k {self.top_k}")
        if self.topk_ids is not None:
            self._check_ids()
        elif self.topk_weights is not None:
            _fail("topk_weights given without topk_ids")

    def _check_ids(self) -> None:
        ids, (_, L, E) = self.topk_ids, self.counts.shape
        N = int(self.tokens.sum())
        if ids.shape != (N, L, self.top_k) or ids.dtype.kind not in "iu":
            _fail(f"topk_ids must be integer [{N}, {L}, {self.top_k}], got {ids.dtype} {ids.shape}")
        if N and (ids.min() < 0 or ids.max() >= E):
            _fail(f"topk_ids must lie in [0, {E})")
        if self.topk_weights is not None and self.topk_weights.shape != ids.shape:
            _fail(f"topk_weights shape {self.topk_weights.shape} differs from topk_ids {ids.shape}")
        if not np.array_equal(counts_from_topk(ids, self.tokens, E), self.counts):
            _fail("counts disagree with topk_ids")

    # ----- construction -----
    @classmethod
    def from_counts(cls, counts: Any, top_k: int, *, source: str = "engine", tokens: Any = None,
                    layer_ids: Any = None, model: str = "", spec_fields: dict | None = None,
                    workload: dict | None = None, provenance: dict | None = None, topk_ids: Any = None,
                    topk_weights: Any = None) -> RoutingTrace:
        """Build from per-step counts [S, L, E] (any integer array-like). tokens default to counts[:, 0].sum() / K;
        layer_ids default to 0..L-1."""
        c = np.asarray(counts)
        if c.ndim != 3:
            _fail(f"counts must be [steps, layers, experts], got shape {c.shape}")
        if c.size and (c.dtype.kind not in "iu" and not np.array_equal(c, np.round(c))):
            _fail("counts must be integers")
        c = c.astype(np.int32)
        if tokens is None:
            tokens = c[:, 0].sum(axis=1, dtype=np.int64) // top_k if c.shape[1] else np.zeros(len(c), np.int64)
        ids = None if topk_ids is None else np.asarray(topk_ids)
        if ids is not None:
            ids = ids.astype(np.int16 if c.shape[2] <= np.iinfo(np.int16).max else np.int32)
        w = None if topk_weights is None else np.asarray(topk_weights, dtype=np.float32)
        return cls(c, np.asarray(tokens, dtype=np.int64), int(top_k), source,
                   tuple(int(i) for i in (range(c.shape[1]) if layer_ids is None else layer_ids)), model,
                   dict(spec_fields or {}), dict(workload or {}), dict(provenance or {}), ids, w)

    @classmethod
    def from_topk(cls, topk_ids: Any, step_tokens: Any, num_experts: int, **kw: Any) -> RoutingTrace:
        """Build from each token's top-k ids [N, L, K] and the tokens of each step (summing to N)."""
        ids = np.asarray(topk_ids)
        if ids.ndim != 3:
            _fail(f"topk_ids must be [tokens, layers, top_k], got shape {ids.shape}")
        tokens = np.asarray(step_tokens, dtype=np.int64)
        if tokens.sum() != len(ids):
            _fail(f"step_tokens sum to {tokens.sum()}, topk_ids has {len(ids)} tokens")
        counts = counts_from_topk(ids, tokens, num_experts)
        return cls.from_counts(counts, ids.shape[2], tokens=tokens, topk_ids=ids, **kw)

    # ----- views -----
    @property
    def num_steps(self) -> int:
        return self.counts.shape[0]

    @property
    def num_layers(self) -> int:
        return self.counts.shape[1]

    @property
    def num_experts(self) -> int:
        return self.counts.shape[2]

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.sum())

    @property
    def has_token_ids(self) -> bool:
        return self.topk_ids is not None

    def step_offsets(self) -> np.ndarray:
        """[S + 1]: token rows of step s are offsets[s]:offsets[s + 1] of topk_ids."""
        return np.concatenate([[0], np.cumsum(self.tokens)])

    def steps(self, start: int, stop: int) -> RoutingTrace:
        """The sub-trace of steps start..stop-1 (token ids sliced to match)."""
        if not 0 <= start < stop <= self.num_steps:
            raise ValueError(f"steps {start}:{stop} outside [0, {self.num_steps}]")
        off = self.step_offsets()
        a, b = off[start], off[stop]
        return RoutingTrace(self.counts[start:stop], self.tokens[start:stop], self.top_k, self.source,
                            self.layer_ids, self.model, self.spec_fields, self.workload, self.provenance,
                            None if self.topk_ids is None else self.topk_ids[a:b],
                            None if self.topk_weights is None else self.topk_weights[a:b])

    def meta(self) -> dict[str, Any]:
        return dict(format=FORMAT, version=VERSION, source=self.source, model=self.model, top_k=self.top_k,
                    num_experts=self.num_experts, num_layers=self.num_layers, num_steps=self.num_steps,
                    layer_ids=list(self.layer_ids), spec_fields=self.spec_fields, workload=self.workload,
                    provenance=self.provenance)

    # ----- file -----
    def save(self, path: str | Path) -> Path:
        """Write a compressed .npz: counts, tokens, optional topk_ids / topk_weights, and meta (JSON)."""
        path = Path(path)
        arrays = dict(counts=self.counts, tokens=self.tokens, meta=np.array(json.dumps(self.meta(), default=str)))
        if self.topk_ids is not None:
            arrays["topk_ids"] = self.topk_ids
        if self.topk_weights is not None:
            arrays["topk_weights"] = self.topk_weights.astype(np.float16)
        with open(path, "wb") as f:
            np.savez_compressed(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        path = Path(path)
        if not path.exists():
            raise ValueError(f"no routing trace at {path}")
        return cls.load_file(path)

    @classmethod
    def load_file(cls, path: Any) -> RoutingTrace:
        """From a path or a binary file object (a trace stored as bytes in the results store)."""
        try:
            z = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ValueError(f"{path} is not a routing trace (.npz): {err}") from None
        with z:
            if "meta" not in z.files or "counts" not in z.files:
                raise ValueError(f"{path} lacks the 'meta' or 'counts' entry of a routing trace")
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != FORMAT or meta.get("version", 0) > VERSION:
                raise ValueError(f"{path}: format {meta.get('format')!r} v{meta.get('version')}; "
                                 f"this moelab reads {FORMAT} v<={VERSION}")
            missing = [k for k in ("top_k", "source", "layer_ids") if k not in meta]
            if missing or "tokens" not in z.files:
                raise ValueError(f"{path}: the trace's metadata lacks {missing or ['tokens']}")
            ids = z["topk_ids"] if "topk_ids" in z.files else None
            w = z["topk_weights"].astype(np.float32) if "topk_weights" in z.files else None
            return cls(z["counts"], z["tokens"], int(meta["top_k"]), meta["source"], tuple(meta["layer_ids"]),
                       meta.get("model", ""), meta.get("spec_fields", {}), meta.get("workload", {}),
                       meta.get("provenance", {}), ids, w)


def counts_from_topk(topk_ids: np.ndarray, step_tokens: np.ndarray, num_experts: int) -> np.ndarray:
    """counts [S, L, E] int32 from per-token ids [N, L, K] and tokens per step [S] (summing to N)."""
    N, L, _ = topk_ids.shape
    S = len(step_tokens)
    if N and (topk_ids.min() < 0 or topk_ids.max() >= num_experts):
        _fail(f"topk_ids must lie in [0, {num_experts})")
    step = np.repeat(np.arange(S), step_tokens)  # [N]
    flat = (step[:, None, None] * L + np.arange(L)[None, :, None]) * num_experts + topk_ids.astype(np.int64)
    counts = np.bincount(flat.ravel(), minlength=S * L * num_experts)
    return counts.reshape(S, L, num_experts).astype(np.int32)
