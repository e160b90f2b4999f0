"""Routing recorder: tokens per expert for every step and MoE layer, gathered on the device without syncs.

Each MoE layer adds its step's counts into its row of a preallocated device buffer [layers, E] with one
scatter-add (so it is captured inside the decode CUDA graphs too); a `valid` mask [max_tokens] keeps graph
padding rows out of the counts. Once per step the runner copies the buffer into pinned host memory right
after the forward and zeroes it (`snapshot`); when the step has finished, `collect` keeps that copy.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from moelab.layers.moe.layer import SparseMoE


class RoutingRecorder:
    def __init__(self, model: nn.Module, max_tokens: int, device: torch.device) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, SparseMoE)]
        if not self.layers:
            raise ValueError("the model has no MoE layer to record")
        E = self.layers[0].experts.num_experts
        self.counts = torch.zeros(len(self.layers), E, dtype=torch.int32, device=device)
        self.valid = torch.ones(max_tokens, dtype=torch.int32, device=device)
        for i, m in enumerate(self.layers):
            m.routing_counts = self.counts[i]
            m.routing_valid = self.valid
        self.steps: list[np.ndarray] = []
        self.tokens: list[int] = []

    def set_valid(self, n: int, padded: int) -> None:
        """The step feeds n real tokens, padded to `padded` rows (CUDA graph bucket)."""
        if padded > n:
            self.valid[n:padded].zero_()
        self.valid[:n].fill_(1)

    def snapshot(self, num_tokens: int) -> tuple[torch.Tensor, int]:
        """Queue the device counts of this step for the host (no sync) and clear them; returns the host buffer
        and the token count, for `collect` once the step has finished (a buffer per step, since the next step
        may be launched before this one is collected)."""
        host = torch.empty(self.counts.shape, dtype=torch.int32, pin_memory=self.counts.is_cuda)
        host.copy_(self.counts, non_blocking=True)
        self.counts.zero_()
        return host, num_tokens

    def collect(self, snap: tuple[torch.Tensor, int]) -> None:
        """Keep a finished step's counts (the caller has waited for the step)."""
        host, num_tokens = snap
        self.steps.append(host.numpy().copy())
        self.tokens.append(num_tokens)

    def reset(self) -> None:
        """Forget everything recorded so far (warm-up, profiling and graph capture also route tokens)."""
        self.counts.zero_()
        self.steps.clear()
        self.tokens.clear()

    def detach(self) -> None:
        for m in self.layers:
            m.routing_counts = None
            m.routing_valid = None

    def as_array(self) -> np.ndarray:
        """counts [steps, layers, E] int32."""
        if not self.steps:
            return np.zeros((0, len(self.layers), self.counts.shape[1]), dtype=np.int32)
        return np.stack(self.steps)
