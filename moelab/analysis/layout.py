"""Layout: how G GPUs split a MoE model (TP, EP, TP+EP, DP-attention+EP, DP replicas), and the candidates for G GPUs.

Two groups of degrees. The non-expert part (attention, dense MLPs, shared experts, router, embedding, LM head) is
attn_tp-way tensor parallel with attn_dp replicas (attn_tp * attn_dp = G); each replica serves its own
sequences. The routed experts are moe_tp-way tensor parallel inside each expert, moe_ep-way expert parallel and
moe_dp replicas of the whole expert set (moe_tp * moe_ep * moe_dp = G).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moelab.spec import ModelSpec

LayoutFamily = Literal["TP", "DP", "EP", "TP+EP", "DPA+EP"]
FAMILIES: tuple[str, ...] = ("TP", "DP", "EP", "TP+EP", "DPA+EP")


@dataclass(frozen=True)
class Layout:
    """Parallel degrees of one deployment. redundant_experts: extra expert slots per MoE layer (EPLB replicas of
    hot experts), spread over the moe_ep ranks.

    Families (what vLLM / SGLang call them):
      TP      everything tensor parallel over G (attn_tp = moe_tp = G)
      DP      attn_dp replicas of a TP group (attn_tp = moe_tp = t, attn_dp = moe_dp = G / t)
      EP      attention TP over G, experts EP over G; tokens are replicated on every GPU after attention, so
              the MoE output is summed with one all-reduce (vLLM `-tp G --enable-expert-parallel`)
      TP+EP   attention TP over G, experts EP x TP (moe_ep * moe_tp = G, both > 1)
      DPA+EP  attention data parallel (attn_dp > 1, optional TP inside each replica), experts EP over the
              G GPUs: tokens travel to their experts' ranks and back (all-to-all dispatch and combine)
    """

    family: str
    attn_tp: int
    attn_dp: int
    moe_tp: int
    moe_ep: int
    moe_dp: int = 1
    redundant_experts: int = 0

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"layout family {self.family!r}; allowed: {', '.join(FAMILIES)}")
        degrees = (self.attn_tp, self.attn_dp, self.moe_tp, self.moe_ep, self.moe_dp)
        if min(degrees) < 1 or self.redundant_experts < 0:
            raise ValueError(f"parallel degrees must be >= 1 and redundant_experts >= 0, got {self}")
        if self.attn_tp * self.attn_dp != self.moe_tp * self.moe_ep * self.moe_dp:
            raise ValueError(f"attention uses {self.attn_tp * self.attn_dp} GPUs but experts use "
                             f"{self.moe_tp * self.moe_ep * self.moe_dp}: {self}")

    @property
    def gpus(self) -> int:
        return self.attn_tp * self.attn_dp

    @property
    def moe_group(self) -> int:
        """GPUs that together hold one copy of every routed expert."""
        return self.moe_tp * self.moe_ep

    @property
    def all_to_all(self) -> bool:
        """True when a MoE group spans several attention replicas, so tokens must be dispatched to their
        experts' ranks and combined back; False when every GPU of the MoE group already holds the tokens
        (TP attention), so an all-reduce of the MoE output is enough."""
        return self.moe_group > self.attn_tp

    @property
    def name(self) -> str:
        if self.gpus == 1:
            return "1 GPU"
        if self.family == "TP":
            return f"TP{self.attn_tp}"
        if self.family == "DP":
            return f"DP{self.attn_dp}xTP{self.attn_tp}" if self.attn_tp > 1 else f"DP{self.attn_dp}"
        exp = f"EP{self.moe_ep}" + (f"xTP{self.moe_tp}" if self.moe_tp > 1 else "")
        if self.redundant_experts:
            exp += f"+{self.redundant_experts}r"
        if self.family in ("EP", "TP+EP"):
            return f"{exp} (attn TP{self.attn_tp})"
        attn = f"DP{self.attn_dp}" + (f"xTP{self.attn_tp}" if self.attn_tp > 1 else "")
        return f"{exp} (attn {attn})"

    def describe(self) -> str:
        return (f"attention TP{self.attn_tp} x DP{self.attn_dp} | experts TP{self.moe_tp} x EP{self.moe_ep}"
                f" x DP{self.moe_dp}")

    def local_experts(self, spec: ModelSpec) -> int:
        """Expert slots per GPU per MoE layer: ceil((E + redundant) / moe_ep)."""
        return -(-(spec.num_experts + self.redundant_experts) // self.moe_ep)

    def problems(self, spec: ModelSpec) -> list[str]:
        """Why this layout cannot run the model (empty when it can)."""
        out = []
        if spec.num_heads % self.attn_tp:
            out.append(f"attention TP{self.attn_tp} does not divide {spec.num_heads} heads")
        if spec.moe_intermediate_size % self.moe_tp:
            out.append(f"expert TP{self.moe_tp} does not divide the expert width {spec.moe_intermediate_size}")
        if self.moe_ep > spec.num_experts + self.redundant_experts:
            out.append(f"EP{self.moe_ep} exceeds the {spec.num_experts} experts (+{self.redundant_experts} "
                       "redundant): some ranks would hold none")
        if self.redundant_experts and (spec.num_experts + self.redundant_experts) % self.moe_ep:
            out.append(f"{spec.num_experts} experts + {self.redundant_experts} redundant do not split evenly "
                       f"over EP{self.moe_ep}")
        return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(spec: ModelSpec, gpus: int, node_size: int = 8) -> list[Layout]:
    """Every layout of each family for `gpus` GPUs that the model's shapes allow (heads divisible by attention
    TP, expert width by expert TP, at least one expert per EP rank). DPA+EP keeps attention TP inside a node.
    When E < G, EP families put the remaining factor into TP inside the experts."""
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    if gpus == 1:
        return [Layout("TP", 1, 1, 1, 1)]
    E, out = spec.num_experts, []
    divs = _divisors(gpus)
    ep_max = max(d for d in divs if d <= E)
    out.append(Layout("TP", gpus, 1, gpus, 1))
    out += [Layout("DP", t, gpus // t, t, 1, gpus // t) for t in divs if t < gpus]
    if ep_max == gpus:
        out.append(Layout("EP", gpus, 1, 1, gpus))
    out += [Layout("TP+EP", gpus, 1, gpus // e, e) for e in divs if 1 < e < gpus and e <= E]
    for t in divs:
        if t < gpus and t <= node_size:
            out.append(Layout("DPA+EP", t, gpus // t, gpus // ep_max, ep_max))
    return [lay for lay in dict.fromkeys(out) if not lay.problems(spec)]


def parse_layout(text: str, gpus: int) -> Layout:
    """'tp', 'dp:t', 'ep', 'tp+ep:e', 'dpa+ep:t' (t = attention TP, e = expert-parallel degree) for `gpus`."""
    name, _, arg = text.lower().partition(":")
    try:
        k = int(arg) if arg else None
    except ValueError:
        raise ValueError(f"layout {text!r}: the number after ':' must be an integer") from None
    if gpus % (k or 1):
        raise ValueError(f"layout {text!r}: {k} does not divide {gpus} GPUs")
    if name == "tp":
        return Layout("TP", gpus, 1, gpus, 1)
    if name == "dp":
        t = k or 1
        return Layout("DP", t, gpus // t, t, 1, gpus // t)
    if name == "ep":
        return Layout("EP", gpus, 1, 1, gpus)
    if name == "tp+ep":
        e = k or gpus
        return Layout("TP+EP", gpus, 1, gpus // e, e)
    if name == "dpa+ep":
        t = k or 1
        return Layout("DPA+EP", t, gpus // t, 1, gpus)
    raise ValueError(f"layout {text!r}; allowed: tp, dp[:attn_tp], ep, tp+ep[:ep], dpa+ep[:attn_tp]")
