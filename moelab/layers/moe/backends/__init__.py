"""MoE backends: functions of one signature,
(x [T, D], topk_ids [T, K], topk_weights [T, K], w13 [E, 2I, D], w2 [E, D, I], scales | None) -> [T, D].
A backend whose attribute `defers_topk_sum` is True also takes `sum_topk=False` and then returns the [T*K, D]
router-weighted rows before the top-k sum (slot t*K + k), for a caller that sums them in its next kernel."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

from moelab.layers.moe.backends.grouped import grouped_moe
from moelab.layers.moe.backends.naive import naive_moe

MoEBackend = Callable[..., torch.Tensor]

BACKENDS: dict[str, MoEBackend] = {"naive": naive_moe, "grouped": grouped_moe}

if importlib.util.find_spec("triton") is not None:  # the triton backend only where triton is installed
    from moelab.layers.moe.backends.triton import triton_moe

    BACKENDS["triton"] = triton_moe


def get_backend(name: str) -> MoEBackend:
    if name not in BACKENDS:
        raise ValueError(f"unknown MoE backend {name!r}; available: {', '.join(BACKENDS)}")
    return BACKENDS[name]
