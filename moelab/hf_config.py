"""Hugging Face `config.json` <-> ModelSpec, for every supported family; and shape overrides on a config.

One table (OVERRIDE_KEYS) names the HF key of each overridable field per family, so reading a config
and overriding one use the same names. No torch here.
"""

from __future__ import annotations

from typing import Any

from moelab.spec import Family, ModelSpec

ARCHITECTURES: dict[str, Family] = {
    "MixtralForCausalLM": "mixtral",
    "OlmoeForCausalLM": "olmoe",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}
MODEL_TYPES: dict[Family, str] = {f: f for f in ARCHITECTURES.values()}

_EXPERTS = {"mixtral": "num_local_experts", "olmoe": "num_experts", "qwen2_moe": "num_experts",
            "qwen3_moe": "num_experts", "deepseek_v2": "n_routed_experts", "deepseek_v3": "n_routed_experts"}
_EXPERT_WIDTH = {"mixtral": "intermediate_size", "olmoe": "intermediate_size", "qwen2_moe": "moe_intermediate_size",
                 "qwen3_moe": "moe_intermediate_size", "deepseek_v2": "moe_intermediate_size",
                 "deepseek_v3": "moe_intermediate_size"}

# override name -> family -> HF key
OVERRIDE_KEYS: dict[str, dict[str, str]] = {
    "layers": {f: "num_hidden_layers" for f in _EXPERTS},
    "hidden_size": {f: "hidden_size" for f in _EXPERTS},
    "heads": {f: "num_attention_heads" for f in _EXPERTS},
    "kv_heads": {f: "num_key_value_heads" for f in _EXPERTS},
    "vocab_size": {f: "vocab_size" for f in _EXPERTS},
    "experts": _EXPERTS,
    "top_k": {f: "num_experts_per_tok" for f in _EXPERTS},
    "moe_intermediate_size": _EXPERT_WIDTH,
    "n_group": {"deepseek_v2": "n_group", "deepseek_v3": "n_group"},
    "topk_group": {"deepseek_v2": "topk_group", "deepseek_v3": "topk_group"},
}


def family_of(config: dict[str, Any]) -> Family:
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    supported = ", ".join(sorted(ARCHITECTURES))
    raise ValueError(f"unsupported architecture {archs or config.get('model_type')!r}; supported: {supported}")


def _rope(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) from either the legacy or the transformers-5 layout."""
    params = config.get("rope_parameters")
    if params is not None:
        theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(config.get("rope_theta", 10000.0))
        scaling = dict(config.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("type", None)
    if scaling.get("rope_type", "default") == "default":
        return theta, None
    if scaling["rope_type"] != "yarn":
        raise ValueError(f"unsupported rope scaling {scaling['rope_type']!r}; supported: default, yarn")
    return theta, scaling


def _num_experts(config: dict[str, Any], family: Family) -> int:
    # transformers 5 may re-save a config with another spelling of the expert count
    for key in (_EXPERTS[family], "num_local_experts", "num_experts", "n_routed_experts"):
        if config.get(key):
            return int(config[key])
    raise ValueError(f"config of family {family} has no expert count ({_EXPERTS[family]})")


def _common(config: dict[str, Any], family: Family) -> dict[str, Any]:
    D, H = config["hidden_size"], config["num_attention_heads"]
    theta, scaling = _rope(config)
    eos = config.get("eos_token_id")
    return dict(
        family=family, vocab_size=config["vocab_size"], hidden_size=D, num_layers=config["num_hidden_layers"],
        num_heads=H, num_kv_heads=config.get("num_key_value_heads") or H,
        head_dim=config.get("head_dim") or D // H,
        num_experts=_num_experts(config, family), top_k=config["num_experts_per_tok"],
        moe_intermediate_size=config[_EXPERT_WIDTH[family]],
        rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=config.get("max_position_embeddings", 4096),
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        bos_token_id=config.get("bos_token_id"), eos_token_id=eos[0] if isinstance(eos, list) else eos,
        pad_token_id=config.get("pad_token_id"),
    )


def eos_token_ids(config: dict[str, Any], generation_config: dict[str, Any] | None = None) -> tuple[int, ...]:
    """Every id that ends a sequence, in order, without repeats: config.json's eos_token_id (an int or a list),
    then generation_config.json's (chat checkpoints list their end-of-turn token there, e.g. Qwen's <|im_end|>
    beside <|endoftext|>). Each must be an int."""
    out: list[int] = []
    for where, cfg in (("config.json", config), ("generation_config.json", generation_config or {})):
        eos = cfg.get("eos_token_id")
        for t in (eos if isinstance(eos, list) else [] if eos is None else [eos]):
            if not isinstance(t, int) or isinstance(t, bool):
                raise ValueError(f"{where}: eos_token_id must be an int or a list of ints, got {eos!r}")
            if t not in out:
                out.append(t)
    return tuple(out)


def _qwen_dense_layers(config: dict[str, Any]) -> tuple[int, ...]:
    step = config.get("decoder_sparse_step", 1) or 1
    only = set(config.get("mlp_only_layers") or [])
    n = config["num_hidden_layers"]
    return tuple(i for i in range(n) if i in only or (i + 1) % step != 0)


def spec_from_hf_config(config: dict[str, Any]) -> ModelSpec:
    family = family_of(config)
    c = _common(config, family)
    if family == "mixtral":
        return ModelSpec(**c, intermediate_size=0, norm_topk_prob=True)
    if family == "olmoe":
        return ModelSpec(**c, intermediate_size=0, norm_topk_prob=bool(config.get("norm_topk_prob", False)),
                         qk_norm="full", clip_qkv=config.get("clip_qkv"),
                         attention_bias=bool(config.get("attention_bias", False)))
    if family in ("qwen2_moe", "qwen3_moe"):
        qwen2 = family == "qwen2_moe"
        return ModelSpec(
            **c, intermediate_size=config.get("intermediate_size", 0),
            dense_layers=_qwen_dense_layers(config),
            shared_intermediate_size=config.get("shared_expert_intermediate_size", 0) if qwen2 else 0,
            shared_expert_gate=qwen2, norm_topk_prob=bool(config.get("norm_topk_prob", False)),
            qk_norm="none" if qwen2 else "per_head",
            attention_bias=qwen2 or bool(config.get("attention_bias", False)),
        )
    return _deepseek_spec(config, family, c)


def _deepseek_spec(config: dict[str, Any], family: Family, c: dict[str, Any]) -> ModelSpec:
    v3 = family == "deepseek_v3"
    n = config["num_hidden_layers"]
    first_dense = config.get("first_k_dense_replace", 3 if v3 else 0) or 0
    freq = config.get("moe_layer_freq", 1) or 1
    c["num_kv_heads"] = c["num_heads"]
    return ModelSpec(
        **c, intermediate_size=config["intermediate_size"],
        dense_layers=tuple(i for i in range(n) if i < first_dense or i % freq != 0),
        shared_intermediate_size=(config.get("n_shared_experts") or 0) * config["moe_intermediate_size"],
        scoring_func=config.get("scoring_func", "sigmoid" if v3 else "softmax"),
        topk_method=config.get("topk_method", "noaux_tc" if v3 else "greedy"),
        norm_topk_prob=bool(config.get("norm_topk_prob", v3)),
        n_group=config.get("n_group") or 1, topk_group=config.get("topk_group") or 1,
        routed_scaling_factor=float(config.get("routed_scaling_factor", 1.0)),
        attention="mla", attention_bias=bool(config.get("attention_bias", False)),
        q_lora_rank=config.get("q_lora_rank"), kv_lora_rank=config["kv_lora_rank"],
        qk_rope_head_dim=config["qk_rope_head_dim"], qk_nope_head_dim=config["qk_nope_head_dim"],
        v_head_dim=config["v_head_dim"],
    )


def apply_overrides(config: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """Return a copy of an HF config with shape overrides (names of OVERRIDE_KEYS; None = keep).

    Shrinking the layer count keeps at least one MoE layer: DeepSeek's first_k_dense_replace is capped
    at layers - 1, and Qwen's mlp_only_layers drops indices past the end.
    """
    family = family_of(config)
    out = dict(config)
    for name, value in overrides.items():
        if value is None:
            continue
        if name not in OVERRIDE_KEYS:
            raise ValueError(f"unknown override {name!r}; allowed: {', '.join(OVERRIDE_KEYS)}")
        if family not in OVERRIDE_KEYS[name]:
            raise ValueError(f"override {name!r} applies to {', '.join(OVERRIDE_KEYS[name])}, not {family}")
        out[OVERRIDE_KEYS[name][family]] = value
    n = out["num_hidden_layers"]
    if "first_k_dense_replace" in out and out["first_k_dense_replace"] >= n:
        out["first_k_dense_replace"] = max(0, n - 1)
    if out.get("mlp_only_layers"):
        out["mlp_only_layers"] = [i for i in out["mlp_only_layers"] if i < n]
    if overrides.get("hidden_size") and "head_dim" in out and family not in ("qwen3_moe",):
        out["head_dim"] = out["hidden_size"] // out["num_attention_heads"]
    if overrides.get("experts") and out.get("n_group", 1) > 1 and out[_EXPERTS[family]] % out["n_group"]:
        raise ValueError(f"--experts {out[_EXPERTS[family]]} is not divisible by n_group={out['n_group']}")
    spec_from_hf_config(out)  # validates the result
    return out
