"""OpenAI request -> engine requests: model check, unsupported fields, prompts (tokenized, chat-templated), context
length and vocabulary checks, SamplingParams. Everything a request can get wrong is found here, before the engine
sees it, and reported as a 400 that names the field (`param`) and what is allowed.

Context rule (vLLM's): a prompt of M tokens needs M < N = max_model_len, and M + max_tokens <= N. max_tokens
omitted: completions 16 (OpenAI), chat N - M (the rest of the context); explicit null: N - M.
A request with several prompts (completions) and n choices each becomes len(prompts) * n engine requests; choice
i uses prompt i // n and, with a seed, seed + i % n (so the n choices differ but each is reproducible).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from moelab.engine.sampling_params import SamplingParams
from moelab.server.chat_template import render_chat
from moelab.server.errors import APIError
from moelab.server.protocol import INT64_MAX, INT64_MIN, ChatCompletionRequest, CompletionRequest, SamplingFields

MAX_CHOICES = 4096  # prompts x n in one request
MAX_STOP_STRINGS = 256  # each is searched at every token on the engine thread, for every request that has it
MAX_STOP_TOKEN_IDS = 1024  # distinct ids; each is tested at every token and banned at each step before min_tokens
# extension fields of other servers (vLLM, SGLang) that constrain or change what is generated: honoured nowhere
# here, so a request that sets one gets a 400 rather than a 200 with unconstrained output
CONSTRAINING_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs",
                       "structural_tag", "json_schema", "regex", "ebnf", "grammar", "allowed_token_ids", "bad_words",
                       "use_beam_search", "length_penalty", "logits_processors", "prompt_logprobs",
                       "truncate_prompt_tokens")

logger = logging.getLogger(__name__)
_logged_unknown: set[str] = set()  # unknown field names already logged (once each, not once per request)


def _neutral(field: str, value: Any) -> bool:
    """A value that asks for nothing: unset, false, empty (0 is not: prompt_logprobs=0 asks for something)."""
    if value is None or value is False or (isinstance(value, (str, list, dict)) and not value):
        return True
    return field == "length_penalty" and value == 1 and value is not True


@dataclass(frozen=True)
class ModelContext:
    """What preprocessing needs to know about the served model."""

    tokenizer: Any
    vocab_size: int
    max_model_len: int
    served_names: tuple[str, ...]
    chat_template: str
    chat_specials: dict[str, str]


@dataclass
class Prepared:
    prompts: list[list[int]]  # token ids per prompt
    params: list[SamplingParams]  # per choice; choice i uses prompts[i // n]
    n: int
    stop_hold: int  # characters a stream holds back: longest stop string - 1
    hold_tokens: int  # with stop strings and min_tokens: a stream sends no text before this many tokens
    include_stop_str: bool

    def prompt_of(self, choice: int) -> list[int]:
        return self.prompts[choice // self.n]


def check_model(model: str | None, ctx: ModelContext) -> str:
    """The served name this request addresses (the first one when omitted); 404 for any other."""
    if model is None:
        return ctx.served_names[0]
    if model not in ctx.served_names:
        raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
    return model


def _reject(field: str, why: str = "is not supported by moelab") -> APIError:
    return APIError(400, f"`{field}` {why}", param=field)


def check_supported(req: SamplingFields) -> None:
    """400 for known fields moelab does not implement, instead of silently ignoring them."""
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "Stream options can only be defined when `stream=True`.", param="stream_options")
    for field, neutral in (("presence_penalty", 0), ("frequency_penalty", 0), ("repetition_penalty", 1),
                           ("min_p", 0)):
        if getattr(req, field) not in (None, neutral):
            raise _reject(field, f"is not supported by moelab (only {neutral} is)")
    if req.logit_bias:
        raise _reject("logit_bias")
    if not req.skip_special_tokens:
        raise _reject("skip_special_tokens", "= false is not supported by moelab")
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise _reject("echo")
        if req.logprobs is not None:
            raise _reject("logprobs")
        if req.suffix:
            raise _reject("suffix")
        if req.best_of not in (None, 1, req.n):
            raise _reject("best_of", "other than n is not supported by moelab")
    if isinstance(req.stop, list) and len(req.stop) > MAX_STOP_STRINGS:
        raise _reject("stop", f"has {len(req.stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
    if req.stop_token_ids and len(set(req.stop_token_ids)) > MAX_STOP_TOKEN_IDS:
        raise _reject("stop_token_ids", f"has {len(set(req.stop_token_ids))} distinct ids; at most "
                                        f"{MAX_STOP_TOKEN_IDS} are allowed")
    extra = req.model_extra or {}
    for field in CONSTRAINING_FIELDS:  # None, false, empty and vLLM's default length_penalty 1 change nothing
        if field in extra and not _neutral(field, extra[field]):
            raise _reject(field)
    new = [k for k in extra if k not in CONSTRAINING_FIELDS and k not in _logged_unknown]
    if new and len(_logged_unknown) < 1000:
        _logged_unknown.update(new)
        logger.info("request fields not known to moelab, ignored: %s",
                    ", ".join(repr(k)[:60] for k in sorted(new)[:20]))
    if isinstance(req, ChatCompletionRequest):
        if req.logprobs or req.top_logprobs:
            raise _reject("logprobs" if req.logprobs else "top_logprobs")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise _reject("response_format", "other than {\"type\": \"text\"} is not supported by moelab")
        if req.tools:
            raise _reject("tools")
        if req.tool_choice not in (None, "none", "auto"):
            raise _reject("tool_choice")


def _check_ids(ids: list[int], vocab_size: int, what: str, param: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} in {what} is out of vocabulary: ids must be in [0, {vocab_size})",
                       param=param)


def completion_prompts(req: CompletionRequest, ctx: ModelContext) -> list[list[int]]:
    p = req.prompt
    items: list = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
    if not items:
        raise APIError(400, "prompt must be a non-empty string, list of strings, or list of token ids",
                       param="prompt")
    out = []
    for i, item in enumerate(items):
        where = "the prompt" if len(items) == 1 else f"prompt {i}"
        ids = ctx.tokenizer.encode(item, add_special_tokens=req.add_special_tokens).ids if isinstance(item, str) \
            else list(item)
        if not ids:
            raise APIError(400, f"{where} is empty; a prompt needs at least one token", param="prompt")
        _check_ids(ids, ctx.vocab_size, where, "prompt")
        out.append(ids)
    return out


def _message_dict(i: int, m: Any) -> dict[str, Any]:
    content = m.content
    if isinstance(content, list):
        kinds = {part.type for part in content} - {"text"}
        if kinds:
            raise APIError(400, f"messages[{i}].content: only text parts are supported, got {sorted(kinds)}",
                           param=f"messages.{i}.content")
        content = "\n".join(part.text or "" for part in content)
    d = {"role": m.role, "content": content or ""}
    if m.name is not None:
        d["name"] = m.name
    return d


def chat_prompt(req: ChatCompletionRequest, ctx: ModelContext) -> list[int]:
    if not req.messages:
        raise APIError(400, "messages must contain at least one message", param="messages")
    messages = [_message_dict(i, m) for i, m in enumerate(req.messages)]
    try:
        text = render_chat(ctx.chat_template, messages, req.add_generation_prompt, ctx.chat_specials)
    except ValueError as err:
        raise APIError(400, str(err), param="messages") from None
    ids = ctx.tokenizer.encode(text, add_special_tokens=req.add_special_tokens).ids
    if not ids:
        raise APIError(400, "the rendered chat prompt is empty", param="messages")
    return ids


def check_length(num_prompt: int, max_tokens: int | None, max_model_len: int, where: str = "") -> int:
    """The output budget of one prompt: max_tokens, or the rest of the context when None."""
    N, M = max_model_len, num_prompt
    if M >= N:
        raise APIError(400, f"This model's maximum context length is {N} tokens. However, your request has {M} "
                            f"input tokens{where}. Please reduce the length of the input messages.",
                       param="input_tokens", code="context_length_exceeded")
    if max_tokens is None:
        return N - M
    if M + max_tokens > N:
        raise APIError(400, f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's "
                            f"maximum context length is {N} tokens and your request has {M} input tokens{where} "
                            f"({max_tokens} > {N} - {M}).", param="max_tokens", code="context_length_exceeded")
    return max_tokens


def _wrap_seed(seed: int) -> int:
    return (seed - INT64_MIN) % 2**64 + INT64_MIN if not INT64_MIN <= seed <= INT64_MAX else seed


def sampling_params(req: SamplingFields, max_tokens: int, seed: int | None) -> SamplingParams:
    try:
        return SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=-1 if req.top_k is None else req.top_k,
            max_tokens=max_tokens, min_tokens=req.min_tokens, ignore_eos=req.ignore_eos,
            stop=req.stop, stop_token_ids=list(req.stop_token_ids or []), seed=seed)
    except ValueError as err:
        word = str(err).split()[0].strip("`'(:")
        raise APIError(400, str(err), param=word if word in SamplingFields.model_fields or word == "max_tokens"
                       else None) from None


def prepare(req: CompletionRequest | ChatCompletionRequest, ctx: ModelContext) -> Prepared:
    """The whole request checked and turned into per-choice engine inputs (raises APIError)."""
    check_supported(req)
    if isinstance(req, CompletionRequest):
        prompts, max_tokens = completion_prompts(req, ctx), req.max_tokens
    else:
        prompts, max_tokens = [chat_prompt(req, ctx)], req.max_completion_tokens or req.max_tokens
    if len(prompts) * req.n > MAX_CHOICES:
        raise APIError(400, f"a request may ask for at most {MAX_CHOICES} completions (prompts x n), got "
                            f"{len(prompts)} x {req.n}", param="n")
    _check_ids(list(req.stop_token_ids or []), ctx.vocab_size, "stop_token_ids", "stop_token_ids")
    params = []
    for i, ids in enumerate(prompts):
        budget = check_length(len(ids), max_tokens, ctx.max_model_len, f" (prompt {i})" if len(prompts) > 1 else "")
        for j in range(req.n):
            params.append(sampling_params(req, budget, None if req.seed is None else _wrap_seed(req.seed + j)))
    stops = params[0].stop
    hold = max((len(s) for s in stops), default=1) - 1
    return Prepared(prompts, params, req.n, hold, req.min_tokens if stops else 0, req.include_stop_str_in_output)
