"""Chat messages -> prompt text, with the checkpoint's own chat template.

The template is `chat_template` from the checkpoint's tokenizer_config.json (a string, or a list of
{"name", "template"} where "default" wins); presets and checkpoints without one use moelab's plain ChatML-style
DEFAULT (moelab.checkpoint.tokenizer.CHAT_TEMPLATE). Templates are rendered in jinja2's sandbox, as transformers
does, with messages, add_generation_prompt, bos_token and eos_token.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from moelab.checkpoint.tokenizer import CHAT_TEMPLATE as DEFAULT


def load_chat_template(model: str) -> tuple[str, dict[str, str]]:
    """(template, special tokens) for a checkpoint directory or a preset name."""
    cfg_file = Path(model) / "tokenizer_config.json"
    if not cfg_file.is_file():
        return DEFAULT, {}
    cfg = json.loads(cfg_file.read_text())
    template = cfg.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    specials = {k: v for k in ("bos_token", "eos_token") if isinstance(v := cfg.get(k), str)}
    return (template if isinstance(template, str) and template else DEFAULT), specials


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as err:
        raise RuntimeError("chat completions need jinja2 (pip install jinja2)") from err

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_chat(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                specials: dict[str, str] | None = None) -> str:
    """Raises ValueError (with the template's own message) when the template rejects the conversation."""
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **(specials or {}))
    except ValueError:
        raise
    except Exception as err:  # jinja2 errors: a bad template or a conversation it cannot render
        raise ValueError(f"the chat template failed: {type(err).__name__}: {err}") from err
