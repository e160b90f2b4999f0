"""Routing recorder: tokens per expert for every step and MoE layer, gathered on the device without syncs.

Each MoE layer adds its step's counts into its row of a preallocated device buffer [layers, E] with one
scatter-add (so it is captured inside the decode CUDA graphs too); a `valid` mask [max_tokens] keeps graph
padding rows out of the counts. Once per step the runner copies the buffer into pinned host memory right
after the forward (the sampler's own sync then covers the copy) and zeroes it; `collect()` hands the
host copy of the step over.
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
        self.host = torch.zeros(len(self.layers), E, dtype=torch.int32, pin_memory=device.type == "cuda")
        for i, m in enumerate(self.layers):
            m.routing_counts = self.counts[i]
            m.routing_valid = self.valid
        self.steps: list[np.ndarray] = []
        self.tokens: list[int] = []
        self._pending: int | None = None

    def set_valid(self, n: int, padded: int) -> None:
        """The step feeds n real tokens, padded to `padded` rows (CUDA graph bucket)."""
        if padded > n:
            self.valid[n:padded].zero_()
        self.valid[:n].fill_(1)

    def snapshot(self, num_tokens: int) -> None:
        """Queue the device counts of this step for the host (no sync) and clear them."""
        self.host.copy_(self.counts, non_blocking=True)
        self.counts.zero_()
        self._pending = num_tokens

    def collect(self, synced: bool = True) -> None:
        """Keep the host copy of the step; synced=False waits for the copy first."""
        if not synced and self.counts.is_cuda:
            torch.cuda.current_stream().synchronize()
        if self._pending is not None:
            self.steps.append(self.host.numpy().copy())
            self.tokens.append(self._pending)
            self._pending = None

    def reset(self) -> None:
        """Forget everything recorded so far (warm-up, profiling and graph capture also route tokens)."""
        self.counts.zero_()
        self.steps.clear()
        self.tokens.clear()
        self._pending = None

    def detach(self) -> None:
        for m in self.layers:
            m.routing_counts = None
            m.routing_valid = None

    def as_array(self) -> np.ndarray:
        """counts [steps, layers, E] int32."""
        if not self.steps:
            return np.zeros((0, len(self.layers), self.counts.shape[1]), dtype=np.int32)
        return np.stack(self.steps)
