"""A human-readable summary of a ModelSpec: shapes, parameter counts, KV bytes and FLOPs per token."""

from __future__ import annotations

from moelab.presets import Published
from moelab.spec import ModelSpec


class _PlainTable:
    """Stand-in for rich.Table where rich is not installed (the GPU image has no rich)."""

    def __init__(self, title: str = "", show_header: bool = True) -> None:
        self.title, self.rows = title, []

    def add_column(self, name: str, **_: object) -> None:
        pass

    def add_row(self, *cells: str) -> None:
        self.rows.append(cells)

    def __str__(self) -> str:
        widths = [max(len(r[i]) for r in self.rows) for i in range(len(self.rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in self.rows]
        return "\n".join([f"== {self.title}", *lines])


def _tables():
    try:
        from rich.console import Console
        from rich.table import Table
        return Table, Console().print
    except ImportError:
        return _PlainTable, print


def _b(n: float) -> str:
    return f"{n / 1e9:.3f} B"


def print_spec(spec: ModelSpec, name: str, published: Published | None = None) -> None:
    Table, show = _tables()
    pc = spec.param_counts()
    shape = Table(title=f"{name} ({spec.family})", show_header=False)
    attn = (f"MLA: kv_lora_rank {spec.kv_lora_rank}, q_lora_rank {spec.q_lora_rank}, rope {spec.qk_rope_head_dim}, "
            f"nope {spec.qk_nope_head_dim}, v {spec.v_head_dim}" if spec.attention == "mla"
            else f"{spec.num_heads} heads / {spec.num_kv_heads} KV heads x {spec.head_dim}, qk_norm {spec.qk_norm}")
    rows = [
        ("layers (MoE / dense)", f"{spec.num_layers} ({spec.num_moe_layers} / {len(spec.dense_layers)})"),
        ("hidden D / vocab V", f"{spec.hidden_size} / {spec.vocab_size}"),
        ("experts E, top-k K", f"{spec.num_experts}, {spec.top_k}"),
        ("expert width I", str(spec.moe_intermediate_size)),
        ("shared expert width", str(spec.shared_intermediate_size)),
        ("routing", f"{spec.scoring_func}, {spec.topk_method}, norm_topk_prob={spec.norm_topk_prob}, "
                    f"groups {spec.topk_group}/{spec.n_group}, scale {spec.routed_scaling_factor}"),
        ("attention", attn),
    ]
    for k, v in rows:
        shape.add_row(k, v)
    counts = Table(title="parameters and costs")
    counts.add_column("quantity")
    counts.add_column("value", justify="right")
    counts.add_column("published", justify="right")
    pub_active = None
    if published:
        pub_active = pc.active if published.active_convention == "with_embedding" else pc.active_without_embedding
    counts.add_row("total parameters", _b(pc.total),
                   f"{_b(published.total)} ({pc.total / published.total - 1:+.2%})" if published else "")
    counts.add_row("active parameters / token", _b(pc.active), "")
    counts.add_row("active without input embedding", _b(pc.active_without_embedding), "")
    if published:
        counts.add_row(f"active ({published.active_convention.replace('_', ' ')})", _b(pub_active),
                       f"{_b(published.active)} ({pub_active / published.active - 1:+.2%})")
    counts.add_row("routed-expert parameters", _b(pc.expert), "")
    counts.add_row("non-expert parameters", _b(pc.non_expert), "")
    for part, n in pc.breakdown.items():
        counts.add_row(f"  {part}", _b(n), "")
    counts.add_row("KV cache bytes / token (bf16)", f"{spec.kv_bytes_per_token(2):,}", "")
    counts.add_row("FLOPs / token (no context)", f"{spec.flops_per_token(0) / 1e9:.2f} GFLOP", "")
    counts.add_row("FLOPs / token (4k context)", f"{spec.flops_per_token(4096) / 1e9:.2f} GFLOP", "")
    show(shape)
    show(counts)
