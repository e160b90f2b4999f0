"""Routing: router logits -> (top-k weights, top-k expert ids), for every supported scheme.

softmax top-k (optionally renormalized) for Mixtral/OLMoE/Qwen; DeepSeek-V2's group-limited greedy;
DeepSeek-V3's sigmoid scoring with a selection-only correction bias (`noaux_tc`), groups ranked by the
sum of their two best biased scores. Weights come out in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moelab.spec import ModelSpec


@dataclass(frozen=True)
class RouterConfig:
    top_k: int
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    norm_topk_prob: bool = False
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0

    @classmethod
    def from_spec(cls, spec: ModelSpec, top_k: int | None = None) -> RouterConfig:
        """`top_k` overrides the model's K (the top-k override study)."""
        return cls(top_k=top_k or spec.top_k, scoring_func=spec.scoring_func, topk_method=spec.topk_method,
                   norm_topk_prob=spec.norm_topk_prob, n_group=spec.n_group, topk_group=spec.topk_group,
                   routed_scaling_factor=spec.routed_scaling_factor)


def _group_mask(group_scores: torch.Tensor, topk_group: int, num_experts: int) -> torch.Tensor:
    """[T, G] group scores -> [T, E] bool, True for experts in the best `topk_group` groups."""
    T, G = group_scores.shape
    idx = group_scores.topk(topk_group, dim=-1, sorted=False).indices
    mask = torch.zeros(T, G, dtype=torch.bool, device=group_scores.device).scatter_(1, idx, True)
    return mask[:, :, None].expand(T, G, num_experts // G).reshape(T, num_experts)


def route(logits: torch.Tensor, cfg: RouterConfig, correction_bias: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> topk_weights [T, K] float32, topk_ids [T, K] int64."""
    logits = logits.float()
    T, E = logits.shape
    if cfg.scoring_func == "sigmoid":
        scores = logits.sigmoid()
    elif cfg.scoring_func == "softmax":
        scores = logits.softmax(dim=-1)
    else:
        raise ValueError(f"unknown scoring_func {cfg.scoring_func!r}; allowed: softmax, sigmoid")
    if cfg.topk_method == "greedy":
        weights, ids = scores.topk(cfg.top_k, dim=-1)
    elif cfg.topk_method == "group_limited_greedy":
        group_scores = scores.view(T, cfg.n_group, E // cfg.n_group).amax(dim=-1)
        masked = scores.masked_fill(~_group_mask(group_scores, cfg.topk_group, E), 0.0)
        weights, ids = masked.topk(cfg.top_k, dim=-1)
    elif cfg.topk_method == "noaux_tc":
        choice = scores + (correction_bias.float() if correction_bias is not None else 0.0)
        group_scores = choice.view(T, cfg.n_group, E // cfg.n_group).topk(2, dim=-1).values.sum(-1)
        choice = choice.masked_fill(~_group_mask(group_scores, cfg.topk_group, E), float("-inf"))
        ids = choice.topk(cfg.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
    else:
        raise ValueError(f"unknown topk_method {cfg.topk_method!r}; allowed: greedy, group_limited_greedy, noaux_tc")
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if cfg.routed_scaling_factor != 1.0:
        weights = weights * cfg.routed_scaling_factor
    return weights, ids
