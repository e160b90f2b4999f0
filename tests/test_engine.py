"""The engine (LLM / LLMEngine) against transformers' generate, token for token, under the conditions that
change its code path: mixed prompt lengths in one batch, chunked prefill, preemption by recompute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import DEV, needs_gpu, write_tiny

from moelab.engine.block_manager import KVCacheLeakError
from moelab.engine.sampling_params import SamplingParams
from moelab.engine.sequence import Sequence
from moelab.llm import LLM

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

FAMILIES = ["mixtral-gqa", "olmoe", "qwen2-moe-dense-first", "qwen3-moe-gqa-norm", "deepseek-v2-lite", "deepseek-v3"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
# (name, engine kwargs): plain; chunked prefill (budget 8 tokens per step); a pool so small that sequences
# get preempted and recomputed. On the CPU in float32 on any machine: token equality with transformers' float32
# generate is a CPU test (on a GPU the engine defaults to bf16, whose tokens may differ)
SETUPS = {
    "plain": dict(max_model_len=64, block_size=4, device="cpu"),
    "chunked": dict(max_model_len=64, block_size=4, max_num_batched_tokens=8, device="cpu"),
    "preempt": dict(max_model_len=64, block_size=4, num_kv_blocks=17, max_num_batched_tokens=16, device="cpu"),
}


def hf_greedy(path: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for p in prompts:
        ref = hf.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=1,
                          attention_mask=torch.ones(1, len(p), dtype=torch.long))
        out.append(ref[0, len(p):].tolist())
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_engine_greedy_matches_transformers(name: str, tiny_checkpoints: dict[str, Path]) -> None:
    path = tiny_checkpoints[name]
    prompts = [torch.randint(4, 320, (n,)).tolist() for n in (5, 29, 1, 13, 21)]
    ref = hf_greedy(path, prompts, GREEDY.max_tokens)
    for setup, kwargs in SETUPS.items():
        llm = LLM(str(path), **kwargs)
        outs = llm.generate(prompts, GREEDY)
        for i, o in enumerate(outs):
            assert o.outputs[0].token_ids == ref[i], (name, setup, i)
            assert o.outputs[0].finish_reason == "length"
            m = o.metrics
            assert len(m.token_times) == 10 and m.token_times == sorted(m.token_times) and m.ttft > 0
            # the timestamps are the ones their names say: arrival <= first scheduled <= first token = the first
            # token's time <= the last token's <= finished
            assert m.arrival_time <= m.first_scheduled_time < m.first_token_time == m.token_times[0]
            assert m.token_times[-1] <= m.finished_time and m.e2e >= m.ttft
        if setup == "preempt":
            assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.block_manager.num_free_blocks == llm.engine.num_blocks - 1
        assert not llm.engine.scheduler.running and not llm.engine.scheduler.waiting


@pytest.fixture(scope="module")
def olmoe(tiny_checkpoints: dict[str, Path]) -> LLM:
    return LLM(str(tiny_checkpoints["olmoe"]), max_model_len=64, block_size=4)


def test_text_prompts_and_text_output(olmoe: LLM) -> None:
    out = olmoe.generate("The router", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert out.prompt == "The router" and out.prompt_token_ids == olmoe.tokenizer.encode("The router").ids
    assert out.outputs[0].text == olmoe.tokenizer.decode(out.outputs[0].token_ids)


def test_stop_conditions(olmoe: LLM) -> None:
    prompt = [7, 8, 9]
    free = olmoe.generate(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0]
    ids = free.token_ids
    # stop token id: included in the ids, ends with reason stop
    o = olmoe.generate(prompt, SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[ids[2]]))[0].outputs[0]
    cut = ids.index(ids[2]) + 1
    assert o.token_ids == ids[:cut] and o.finish_reason == "stop" and o.stop_reason == ids[2]
    # min_tokens masks the stop token until reached
    o = olmoe.generate(prompt, SamplingParams(temperature=0, max_tokens=8, min_tokens=8,
                                              stop_token_ids=[ids[0]]))[0].outputs[0]
    assert len(o.token_ids) == 8 and ids[0] not in o.token_ids
    # stop string: the text ends before it
    text = olmoe.tokenizer.decode(ids)
    stop = text[2:4]
    o = olmoe.generate(prompt, SamplingParams(temperature=0, max_tokens=8, stop=stop, ignore_eos=True))[0].outputs[0]
    assert o.finish_reason == "stop" and o.stop_reason == stop and o.text == text[:text.find(stop)]


def test_stop_strings_end_where_a_full_decode_at_every_token_would(olmoe: LLM) -> None:
    """The engine searches stop strings incrementally (the new end of the text only). Its result is that of
    decoding the whole output at every token and searching all of it: stops that span several tokens, several
    stops (the earliest wins), a stop already in the text when min_tokens is reached, a stop never met."""
    prompt = [7, 8, 9]
    n = 40
    ids = olmoe.generate(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0].outputs[0].token_ids
    dec = olmoe.tokenizer.decode
    text = dec(ids)
    assert len(text) > 40

    def full_decode_rule(stop: list[str], min_tokens: int) -> tuple[int, str | None, str]:
        # vLLM's rule: a stop string counts where it ends after the text of the first min_tokens tokens
        base = len(dec(ids[:min_tokens])) if min_tokens else 0
        for k in range(min_tokens + 1, n + 1):
            t = dec(ids[:k])
            hits = [(at, x) for x in stop if (at := t.find(x, max(0, base - len(x) + 1))) >= 0]
            if hits:
                at, x = min(hits)
                return k, x, t[:at]
        return n, None, text

    early = next(i for i in range(3, 20) if text[i:i + 3] not in text[i + 3:])  # a string that occurs once
    cases = [([text[20:31]], 0), ([text[30:34], text[12:20]], 0), ([text[3:6]], 25), (["\u2603never"], 0),
             ([text[len(text) - 3:]], 0), ([text[early:early + 3]], 12), ([text[early:early + 3]], 0)]
    for stop, min_tokens in cases:
        k, reason, want = full_decode_rule(stop, min_tokens)
        o = olmoe.generate(prompt, SamplingParams(temperature=0, max_tokens=n, stop=stop, min_tokens=min_tokens,
                                                  ignore_eos=True))[0].outputs[0]
        assert o.token_ids == ids[:k], (stop, min_tokens)
        assert o.stop_reason == reason and o.finish_reason == ("stop" if reason else "length")
        assert o.text == want


def test_stop_search_sees_text_held_back_for_an_incomplete_character() -> None:
    """Byte-level BPE: one token can complete a stop string and start a multi-byte character ("c" + the first byte
    of "中"). The whole-output decode at that token ends in U+FFFD and already holds "abc"; so must the incremental
    search (it searches what the detokenizer holds back too). Also a stop string that is a prefix of another."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer, decoders, models

    from moelab.engine.llm_engine import LLMEngine
    from moelab.engine.sequence import Sequence

    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_char = dict(zip(bs, map(chr, cs)))  # GPT-2's byte-to-character map

    def enc(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    zh = "中".encode()
    vocab = {enc(b"a"): 0, enc(b"b"): 1, enc(b"c" + zh[:1]): 2, enc(zh[1:]): 3, enc(b"x"): 4, "<eos>": 5}
    tok = Tokenizer(models.BPE(vocab, []))
    tok.decoder = decoders.ByteLevel()
    eng = SimpleNamespace(tokenizer=tok, eos_token_ids=(5,), max_model_len=100)

    def engine_rule(max_tokens, outs, stop):
        seq = Sequence("r", [4], SamplingParams(max_tokens=max_tokens, stop=list(stop)), max_tokens)
        for t in outs:
            seq.token_ids.append(t)
            LLMEngine._check_stop(eng, seq, t)
            if seq.finished:
                break
        return seq.finish_reason, seq.stop_reason, seq.output_token_ids, LLMEngine.output_text(eng, seq)

    def whole_decode_rule(max_tokens, outs, stop):
        for k in range(1, len(outs) + 1):
            if outs[k - 1] == 5:  # EOS: stop_reason None
                return "stop", None, outs[:k], tok.decode(outs[:k])
            t = tok.decode(outs[:k])
            hits = [(t.find(x), x) for x in stop if x in t]
            if hits:
                return "stop", min(hits)[1], outs[:k], t[:min(hits)[0]]
            if k >= max_tokens:
                return "length", None, outs[:k], t
        raise AssertionError("ran out of tokens")

    for max_tokens, outs, stop in [(3, [0, 1, 2, 3], ["abc"]), (10, [0, 1, 2, 5], ["abc"]),
                                   (10, [4, 0, 1, 2, 3, 4], ["abc", "ab"]), (10, [0, 1, 2, 3, 4, 4], ["中x"]),
                                   (10, [4, 0, 4, 0, 1, 2, 3], ["xab", "x"])]:
        assert engine_rule(max_tokens, outs, stop) == whole_decode_rule(max_tokens, outs, stop), (outs, stop)


def test_eos_ends_generation_unless_ignored(tiny_checkpoints: dict[str, Path]) -> None:
    llm = LLM(str(tiny_checkpoints["olmoe"]), max_model_len=64)
    prompt = [7, 8, 9]
    ids = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0].outputs[0].token_ids
    llm.engine.eos_token_ids = (ids[1],)
    o = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6))[0].outputs[0]
    assert o.token_ids == ids[:2] and o.finish_reason == "stop" and o.stop_reason is None
    o = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0].outputs[0]
    assert o.token_ids == ids
    # every EOS id ends it (a chat checkpoint's end of turn beside its end of text), and min_tokens bans them all
    llm.engine.eos_token_ids = (ids[4], ids[2])
    o = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6))[0].outputs[0]
    assert o.token_ids == ids[:3] and o.stop_reason is None
    o = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6, min_tokens=3))[0].outputs[0]
    assert ids[2] not in o.token_ids[:3] and o.token_ids[:2] == ids[:2]


def test_eos_ids_come_from_config_and_generation_config(tmp_path: Path) -> None:
    """config.json's eos_token_id (int or list) first, then generation_config.json's, without repeats; a bad
    value names its file."""
    from moelab.hf_config import eos_token_ids

    assert eos_token_ids({"eos_token_id": 2}) == (2,)
    assert eos_token_ids({"eos_token_id": [151645, 151643]}, {"eos_token_id": [151643, 7]}) == (151645, 151643, 7)
    assert eos_token_ids({}, {"eos_token_id": 9}) == (9,) and eos_token_ids({}) == ()
    with pytest.raises(ValueError, match="generation_config.json: eos_token_id must be"):
        eos_token_ids({"eos_token_id": 2}, {"eos_token_id": "2"})
    ckpt = write_tiny("olmoe", tmp_path / "ckpt")
    gen = json.loads((ckpt / "generation_config.json").read_text())
    first = json.loads((ckpt / "config.json").read_text())["eos_token_id"]
    gen["eos_token_id"] = [first, 77]
    (ckpt / "generation_config.json").write_text(json.dumps(gen))
    llm = LLM(str(ckpt), max_model_len=32)
    assert llm.engine.eos_token_ids == (first, 77) and llm.engine.eos_token_id == first
    (ckpt / "generation_config.json").write_text("{not json")
    with pytest.raises(Exception, match="generation_config.json: not valid JSON"):
        LLM(str(ckpt), max_model_len=32)


def test_seeded_sampling_is_reproducible_whatever_the_batch(olmoe: LLM) -> None:
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=8, seed=1234, ignore_eos=True)
    alone = olmoe.generate([5, 6], p)[0].outputs[0].token_ids
    others = SamplingParams(temperature=0.8, max_tokens=8, ignore_eos=True)
    batch = olmoe.generate([[9, 9, 9], [5, 6], [3]], [others, p, others])
    assert batch[1].outputs[0].token_ids == alone
    other_seed = olmoe.generate([5, 6], SamplingParams(temperature=1.0, max_tokens=8, seed=99, ignore_eos=True))
    assert other_seed[0].outputs[0].token_ids != alone


def test_max_tokens_capped_by_max_model_len(olmoe: LLM) -> None:
    o = olmoe.generate([4] * 60, SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0]
    assert len(o.outputs[0].token_ids) == 4 and o.outputs[0].finish_reason == "length"


def test_bad_requests_are_refused_and_lose_nothing(olmoe: LLM) -> None:
    with pytest.raises(ValueError, match="max_model_len is 64"):
        olmoe.generate([[5, 6], [4] * 64], SamplingParams(temperature=0, max_tokens=2))
    assert not olmoe.engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="empty"):
        olmoe.generate([[]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        olmoe.generate([[5, 100000]])
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    assert olmoe.engine.block_manager.num_free_blocks == olmoe.engine.num_blocks - 1
    assert olmoe.generate([5, 6], SamplingParams(temperature=0, max_tokens=2))[0].outputs[0].token_ids


def test_abort_frees_blocks(olmoe: LLM) -> None:
    eng = olmoe.engine
    for i in range(3):
        eng.add_request([5, 6, 7, 8, 9], SamplingParams(temperature=0, max_tokens=20), request_id=f"a{i}")
    eng.step()
    eng.step()
    assert eng.block_manager.num_free_blocks < eng.num_blocks - 1
    assert eng.abort_request("a1") and not eng.abort_request("a1") and not eng.abort_request("nope")
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.block_manager.num_free_blocks == eng.num_blocks - 1


def test_going_idle_with_blocks_or_requests_held_fails_loudly(olmoe: LLM) -> None:
    """reliability C6: whenever the engine goes idle every KV block must be free and no request tracked; a leak
    fails at the step (or abort) that left it, with its counts, instead of slowly shrinking the cache."""
    eng = olmoe.engine
    eng.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=3), request_id="ok")
    while eng.has_unfinished_requests():
        eng.step()  # a normal run goes idle without complaint
    ghost = Sequence("ghost", [1, 2, 3, 4, 5], SamplingParams(max_tokens=1), max_tokens=1)
    eng.block_manager.allocate(ghost, 5)  # blocks held by a sequence the scheduler does not know
    held = eng.block_manager.blocks_for(5)
    with pytest.raises(KVCacheLeakError, match=rf"no sequence is left but {held} of \d+ blocks are not free"):
        eng.step()
    eng.block_manager.free(ghost)
    eng.step()
    eng.requests["stale"] = ghost
    with pytest.raises(KVCacheLeakError, match="tracks 1 requests"):
        eng.step()
    del eng.requests["stale"]
    eng.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=30), request_id="gone")
    eng.step()
    eng.block_manager.ref_counts[eng.requests["gone"].block_table[0]] += 1  # a reference nobody drops
    with pytest.raises(KVCacheLeakError):  # an abort that leaves the engine idle is checked there, or at the next
        eng.abort_request("gone")  # step when a launched step was still in flight
        for _ in range(3):
            eng.step()
    b = next(b for b, n in enumerate(eng.block_manager.ref_counts) if n)
    eng.block_manager.ref_counts[b] = 0
    eng.block_manager.free_blocks.appendleft(b)
    eng.step()


def test_unknown_model_and_tiny_pool_errors(tiny_checkpoints: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="neither a checkpoint directory nor a preset"):
        LLM("no-such-model")
    with pytest.raises(ValueError, match="less than one sequence of max_model_len=64"):
        LLM(str(tiny_checkpoints["olmoe"]), max_model_len=64, block_size=4, num_kv_blocks=8)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        LLM(str(tiny_checkpoints["olmoe"]), block_size=6)


def test_preset_model_equals_its_written_checkpoint(tmp_path: Path) -> None:
    from moelab.checkpoint.synthetic import make_checkpoint

    shape = dict(layers=2, hidden_size=64, heads=4, kv_heads=2, experts=8, moe_intermediate_size=32, vocab_size=320)
    make_checkpoint("qwen3-30b-a3b", tmp_path, seed=5, dtype="float32", **shape)
    p = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    a = LLM(str(tmp_path), seed=5, max_model_len=64).generate([4, 5, 6], p)[0].outputs[0].token_ids
    b = LLM("qwen3-30b-a3b", overrides=shape, seed=5, max_model_len=64).generate([4, 5, 6], p)[0].outputs[0].token_ids
    assert a == b


def test_routing_recorder_counts_every_token(tiny_checkpoints: dict[str, Path]) -> None:
    """Per step and MoE layer: the recorder's count of each expert is the number of valid tokens routed to it
    (checked against the ids each layer's router returned, so a count on the wrong expert fails)."""
    import numpy as np

    from moelab.layers.moe.layer import SparseMoE

    llm = LLM(str(tiny_checkpoints["qwen2-moe-dense-first"]), max_model_len=64, block_size=4,
              max_num_batched_tokens=8, record_routing=True)
    E = llm.engine.spec.num_experts
    blocks = [layer.ffn for layer in llm.engine.model.model.layers if isinstance(layer.ffn, SparseMoE)]
    routed = [np.zeros(E, dtype=np.int64) for _ in blocks]

    def wrap(block, i):
        original = block.route

        def route(x):
            out = original(x)
            routed[i] += np.bincount(out[1].reshape(-1).cpu().numpy(), minlength=E)
            return out

        block.route = route

    for i, block in enumerate(blocks):
        wrap(block, i)
    outs = llm.generate([[5] * 13, [6] * 3], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    rec = llm.engine.runner.recorder
    counts = rec.as_array()  # [steps, moe layers, E]
    spec = llm.engine.spec
    assert counts.shape[1:] == (spec.num_moe_layers, spec.num_experts)
    fed = 13 + 3 + sum(len(o.outputs[0].token_ids) - 1 for o in outs)  # prompts + every token fed back
    assert sum(rec.tokens) == fed
    assert (counts.sum(axis=2) == [[t * spec.top_k] * spec.num_moe_layers for t in rec.tokens]).all()
    assert all((counts.sum(axis=0)[i] == routed[i]).all() for i in range(len(blocks))), (counts.sum(axis=0), routed)


@pytest.mark.parametrize("name", ["olmoe", "deepseek-v2-lite", "qwen3-moe-gqa-norm"])
def test_triton_attention_path_matches_sdpa(name: str, tiny_checkpoints: dict[str, Path]) -> None:
    """The engine with the paged Triton kernel (absorbed MLA for DeepSeek; q/k norm + RoPE + KV store as one
    kernel for OLMoE's norm over all heads and Qwen3's per-head norm), under the interpreter on the CPU,
    generates what the SDPA reference path generates; chunked prefill and decode both go through it."""
    path = str(tiny_checkpoints[name])
    prompts = [[5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45], [7, 8]]
    p = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    kw = dict(max_model_len=32, block_size=4, max_num_batched_tokens=8)
    ref = LLM(path, attention="sdpa", **kw).generate(prompts, p)
    got = LLM(path, attention="triton", **kw).generate(prompts, p)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]


def test_mla_one_token_kernels_change_no_token(tiny_checkpoints: dict[str, Path], monkeypatch) -> None:
    """DeepSeek's one-token decode steps take mla_prep (bmm, cat, rms_norm, rotary and store_kv in one launch) and
    mla_uv (the value half as a GEMV): the same tokens as without them and as the SDPA reference, and they are
    really taken."""
    from moelab.kernels import mla_decode

    path = str(tiny_checkpoints["deepseek-v2-lite"])
    prompts = [[5, 9, 13, 17, 21, 25, 29]]
    p = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    kw = dict(max_model_len=32, block_size=4)
    calls = {"mla_prep": 0, "mla_uv": 0}
    for name in calls:
        real = getattr(mla_decode, name)
        monkeypatch.setattr(mla_decode, name, lambda *a, _r=real, _n=name, **k: calls.__setitem__(_n, calls[_n] + 1)
                            or _r(*a, **k))
    got = LLM(path, attention="triton", **kw).generate(prompts, p)
    assert min(calls.values()) >= 4  # every layer of the decode steps
    mla_decode.set_enabled(False, uv=False)
    try:
        before = dict(calls)
        off = LLM(path, attention="triton", **kw).generate(prompts, p)
        assert calls == before
    finally:
        mla_decode.set_enabled(True, uv=True)
    ref = LLM(path, attention="sdpa", **kw).generate(prompts, p)
    assert got[0].outputs[0].token_ids == off[0].outputs[0].token_ids == ref[0].outputs[0].token_ids


@pytest.mark.parametrize("name", ["olmoe", "qwen2-moe-shared-e6", "deepseek-v2-lite"])
def test_fused_residual_norms_read_settled_residuals(name: str, tiny_checkpoints: dict[str, Path],
                                                     monkeypatch) -> None:
    """The decoder's fused-residual forward tells every residual add (add_rms_norm and the router's folded norm)
    that its residual is two launches old, so they read it before their PDL wait; the tokens do not change."""
    from moelab.kernels import rms_norm, topk_router

    seen = []
    for mod, fn in ((rms_norm, "add_rms_norm"), (topk_router, "add_norm_router_topk")):
        real = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, lambda *a, _r=real, **k: seen.append(k.get("residual_settled")) or _r(*a, **k))
    path = str(tiny_checkpoints[name])
    p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    kw = dict(max_model_len=32, block_size=4)
    got = LLM(path, attention="triton", moe_backend="triton", **kw).generate([[5, 9, 13, 17, 21]], p)
    assert len(seen) >= 4 and all(seen), seen
    ref = LLM(path, attention="sdpa", **kw).generate([[5, 9, 13, 17, 21]], p)
    assert got[0].outputs[0].token_ids == ref[0].outputs[0].token_ids


@pytest.mark.parametrize("name", ["qwen2-moe-shared-e6", "deepseek-v2-lite", "olmoe"])
def test_shared_experts_settle_the_routing(name: str, tiny_checkpoints: dict[str, Path], monkeypatch) -> None:
    """One-row decode with the norm folded into the router: a block with a shared expert runs it between the
    router and the routed experts and tells the backend the routing is settled (two launches old); one without
    does not. Qwen2-MoE, whose router kernel also gives the shared gate, routes first at any row count. The tokens
    are those of the SDPA / naive reference."""
    from moelab.layers.moe.backends import triton as tb

    seen = []
    real = tb.fused_moe
    monkeypatch.setattr(tb, "fused_moe", lambda x, *a, **k: seen.append((x.shape[0], k.get("routing_settled")))
                        or real(x, *a, **k))
    path = str(tiny_checkpoints[name])
    p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    kw = dict(max_model_len=32, block_size=4)
    got = LLM(path, attention="triton", moe_backend="triton", **kw).generate([[5, 9, 13, 17, 21]], p)
    one_row = [settled for rows, settled in seen if rows == 1]
    assert one_row and all(s == (name != "olmoe") for s in one_row), seen
    # more rows: Qwen2-MoE routes before its shared expert itself (its gate comes with the routing), the others not
    assert all(settled == (name.startswith("qwen2")) for rows, settled in seen if rows > 1), seen
    ref = LLM(path, attention="sdpa", **kw).generate([[5, 9, 13, 17, 21]], p)
    assert got[0].outputs[0].token_ids == ref[0].outputs[0].token_ids


def test_qwen2_shared_gate_rides_in_the_router(tiny_checkpoints: dict[str, Path], monkeypatch) -> None:
    """With the fused routing Qwen2-MoE's shared-expert gate is one more row of the router kernel: its own Linear is
    not called on the Triton path where the block routes itself (prefill, decode of two rows), it is at one row (the
    norm-and-router kernel keeps the gate apart there, measured faster), the weights stay what the checkpoint holds,
    and the tokens equal the separate gate's and the reference's."""
    from moelab.models import qwen2_moe

    path = str(tiny_checkpoints["qwen2-moe-shared-e6"])
    p = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    kw = dict(max_model_len=32, block_size=4, max_num_batched_tokens=8)
    prompts = [[5, 9, 13, 17, 21, 25, 29, 33, 37], [7, 8]]
    calls = [0]
    real = qwen2_moe.Linear.forward
    monkeypatch.setattr(qwen2_moe.Linear, "forward", lambda self, x: calls.__setitem__(0, calls[0] + (
        self.out_features == 1)) or real(self, x))
    llm = LLM(path, attention="triton", moe_backend="triton", **kw)
    blocks = [m for m in llm.engine.model.modules() if isinstance(m, qwen2_moe.Qwen2MoeBlock)]
    assert blocks and all(b.gate_rows is not None for b in blocks)
    for b in blocks:  # views of one buffer (no second copy), holding what a fresh load holds
        E = b.gate.weight.shape[0]
        assert b.gate.weight.data_ptr() == b.gate_rows.data_ptr()
        assert b.shared_expert_gate.weight.data_ptr() == b.gate_rows[E:].data_ptr()
    fresh = LLM(path, attention="sdpa", **kw).engine.model.state_dict()
    for k, v in llm.engine.model.state_dict().items():
        if "gate" in k and "experts" not in k:
            assert torch.equal(v, fresh[k]), k
    got = llm.generate(prompts, p)
    assert calls[0] == 0
    one = llm.generate(prompts[:1], p)
    assert calls[0] > 0  # one-row decode steps: the gate's own GEMV
    calls[0] = 0
    x = torch.randn(3, blocks[0].gate.weight.shape[1])
    with torch.no_grad():  # the gate's logits from the router kernel are the gate's own
        torch.testing.assert_close(blocks[0].route(x)[2], blocks[0].shared_expert_gate(x), atol=1e-5, rtol=1e-5)
        assert len(blocks[0].route(x[:1])) == 2  # one row: the gate apart
        # a replaced shared-gate weight (assign=True loads, direct assignment) is seen: the router no longer uses
        # the old row
        b = blocks[-1]
        new = torch.randn_like(b.shared_expert_gate.weight)
        b.shared_expert_gate.weight = torch.nn.Parameter(new, requires_grad=False)
        assert len(b.route(x)) == 2 and torch.equal(b.shared_expert_gate.weight, new)
    qwen2_moe.set_gate_in_router(False)
    calls[0] = 0
    try:
        sep = LLM(path, attention="triton", moe_backend="triton", **kw)
        assert all(m.gate_rows is None for m in sep.engine.model.modules() if isinstance(m, qwen2_moe.Qwen2MoeBlock))
        off = sep.generate(prompts, p)
        assert calls[0] > 0
    finally:
        qwen2_moe.set_gate_in_router(True)
    ref = LLM(path, attention="sdpa", **kw).generate(prompts, p)
    tokens = [[o.outputs[0].token_ids for o in outs] for outs in (got, off, ref)]
    assert tokens[0] == tokens[1] == tokens[2]
    assert one[0].outputs[0].token_ids == tokens[2][0]


def test_graph_staging_pads_decode_batches(olmoe: LLM) -> None:
    """A decode step staged for a graph bucket: padding rows feed token 0 at position 0 of the reserved block 0 with
    one token of context; rows whose token is in flight are fed from the previous step's ids inside the graph."""
    from moelab.engine.cuda_graph import DecodeGraphs

    eng = olmoe.engine
    runner = eng.runner
    runner.graphs = DecodeGraphs(eng.model, 8, runner.max_blocks_per_seq, runner.block_size, eng.max_model_len,
                                 runner.device, max_rows=8, eager=True)
    try:
        for i in range(3):
            eng.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=5), request_id=f"pad{i}")
        eng.step()  # the prompts; with overlapped steps their first tokens are still in flight
        batch = eng.scheduler.schedule()
        assert batch.all_decode and len(batch) == 3
        prev = eng._inflight
        runner._stage_decode(batch, 4, prev)
        st = runner.graphs.staging[4]
        assert st[1].tolist() == [3, 3, 3, 0] and st[2, 3] == 0 and st[4].tolist() == [4, 4, 4, 1]
        assert st[3].tolist() == [prev.rows[id(s)] for s in batch.seqs] + [-1] and st[0, 3] == 0
        assert runner.graphs.block_tables[3].sum() == 0
        assert torch.equal(runner.graphs.tokens[1, :3], prev.tokens_dev)  # prev ran without a graph: copied in
        for seq in batch.seqs:
            eng.abort_request(seq.request_id)
        assert eng.block_manager.num_free_blocks == eng.num_blocks - 1
    finally:
        runner.graphs = None
        eng._inflight = None


def test_decode_graph_plumbing_changes_no_token(tiny_checkpoints: dict[str, Path]) -> None:
    """The decode-graph path (staged inputs, ids of in-flight tokens fed inside the step, greedy ids into the token
    buffer, block tables copied only when they change) gives the tokens of the path without graphs: greedy and
    seeded sampled requests, min_tokens, a request that arrives mid-decode (a prefill between graph steps), batches
    that shrink across buckets. On the CPU the graph's function runs eagerly; on a GPU the captured graphs replay,
    against enforce_eager (float32 both)."""
    from moelab.engine.cuda_graph import DecodeGraphs

    path = str(tiny_checkpoints["olmoe"])
    base = dict(max_model_len=64, block_size=4, max_num_batched_tokens=16, attention="triton", device=DEV,
                dtype="float32", num_kv_blocks=64)
    prompts = [[5, 6, 7], [9] * 11, [11, 12], [13] * 7, [4, 8, 15, 16, 23, 42]]
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=3, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=1.0, top_k=20, seed=11, max_tokens=7, min_tokens=5),
              SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)]
    results = []
    for graphs in (False, True):
        llm = LLM(path, enforce_eager=not graphs, cuda_graph_max_bs=4, **base)
        eng = llm.engine
        runner = eng.runner
        replays = []
        if graphs:
            if DEV == "cpu":
                runner.graphs = DecodeGraphs(eng.model, 4, runner.max_blocks_per_seq, runner.block_size,
                                             eng.max_model_len, runner.device, max_rows=llm.config.max_num_seqs,
                                             eager=True)
            g = runner.graphs
            replay = g.replay
            g.replay = lambda bs, replay=replay, replays=replays: replays.append(bs) or replay(bs)
        got = {}
        for i in range(4):
            eng.add_request(prompts[i], params[i], request_id=str(i))
        steps = 0
        while eng.has_unfinished_requests():
            steps += 1
            if steps == 6:  # a late arrival: its prompt runs in a step without a graph
                eng.add_request(prompts[4], params[4], request_id="4")
            for seq, toks in eng.step():
                got.setdefault(seq.request_id, []).extend(toks)
        results.append(got)
        if graphs:
            assert set(replays) >= {1, 2, 4} and len(replays) >= 10
            assert 0 < g.num_table_uploads < len(replays)  # tables change every block_size tokens, not every step
    assert results[0] == results[1]
    assert [len(results[1][str(i)]) for i in (0, 1, 2, 4)] == [12, 9, 10, 14]


@pytest.mark.parametrize("name", ["qwen2-moe-shared-e6", "deepseek-v3", "olmoe"])
def test_fast_path_keeps_the_logits(name: str, tiny_checkpoints: dict[str, Path]) -> None:
    """prepare_fast_path (kernels for the small ops, fused QKV and gate/up, MLA absorption weights) changes no
    number that matters: prefill logits equal the reference path's to float32 rounding."""
    from moelab.context import ForwardContext, forward_context
    from moelab.models.loader import load_model

    path = tiny_checkpoints[name]
    ids = torch.randint(4, 320, (9,))
    ref_model, fast_model = load_model(path), load_model(path)
    fast_model.prepare_fast_path(64)
    with torch.no_grad(), forward_context(ForwardContext.for_prompts([9])):
        want = ref_model.compute_logits(ref_model(ids, torch.arange(9)))
    with torch.no_grad(), forward_context(ForwardContext.for_prompts([9])):
        got = fast_model.compute_logits(fast_model(ids, torch.arange(9)))
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    assert {k: v.shape for k, v in fast_model.state_dict().items()} == \
        {k: v.shape for k, v in ref_model.state_dict().items()}


@pytest.mark.parametrize("name,folds", [("olmoe", True), ("mixtral-gqa", True), ("deepseek-v2-lite", True),
                                        ("qwen2-moe-shared-e6", True), ("deepseek-v2-group", False)])
def test_one_row_folds_the_post_attention_norm_into_the_router(name: str, folds: bool, tiny_checkpoints,
                                                               monkeypatch) -> None:
    """A one-token forward on the fast path computes each MoE layer's post-attention norm and routing in one kernel
    (add_norm_router_topk) where the block routes with the plain top-k kernel, and the logits are those with the
    fold switched off (Qwen2-MoE's gated shared expert included: its mix happens in the next norm); group-limited
    routing keeps the two steps."""
    from moelab.context import ForwardContext, forward_context
    from moelab.kernels import topk_router
    from moelab.layers.moe.layer import SparseMoE
    from moelab.models.loader import load_model

    model = load_model(tiny_checkpoints[name], moe_backend="triton")
    model.prepare_fast_path(64)
    calls = []
    real = topk_router.add_norm_router_topk
    monkeypatch.setattr(topk_router, "add_norm_router_topk", lambda *a, **k: calls.append(1) or real(*a, **k))

    def logits(fold: bool) -> torch.Tensor:
        topk_router.set_norm_fold(fold)
        try:
            with torch.no_grad(), forward_context(ForwardContext.for_prompts([1])):
                return model.compute_logits(model(torch.tensor([17]), torch.tensor([0])))
        finally:
            topk_router.set_norm_fold(True)

    on = logits(True)
    n_moe = sum(1 for m in model.modules() if isinstance(m, SparseMoE))
    assert len(calls) == (n_moe if folds else 0)
    calls.clear()
    off = logits(False)
    assert not calls and torch.equal(on, off)


def test_qwen2_moe_mix_in_the_next_norm_keeps_the_tokens(tiny_checkpoints: dict[str, Path], monkeypatch) -> None:
    """Qwen2-MoE's routed sum and sigmoid-gated shared expert inside the next norm's kernel (TopKRows with a gate):
    the same greedy tokens as the block mixing them itself (set_fold(False)), decode and chunked prefill."""
    from moelab.kernels import rms_norm
    from moelab.models import qwen2_moe

    path = str(tiny_checkpoints["qwen2-moe-shared-e6"])
    prompts = [[5, 9, 13, 17, 21, 25, 29, 33, 37, 41], [7, 8]]
    p = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    kw = dict(max_model_len=32, block_size=4, max_num_batched_tokens=8, moe_backend="triton", attention="triton")
    gated = []
    real = rms_norm.add_rms_norm
    monkeypatch.setattr(rms_norm, "add_rms_norm", lambda *a, **k: gated.append(k.get("extra_gate") is not None)
                        or real(*a, **k))
    folded = LLM(path, **kw).generate(prompts, p)
    assert any(gated)  # the mix really happened inside the norm
    qwen2_moe.set_fold(False)
    try:
        gated.clear()
        own = LLM(path, **kw).generate(prompts, p)
        assert not any(gated)
    finally:
        qwen2_moe.set_fold(True)
    assert [o.outputs[0].token_ids for o in folded] == [o.outputs[0].token_ids for o in own]


@pytest.mark.parametrize("name", ["olmoe", "qwen3-moe-gqa-norm", "qwen2-moe-shared-e6", "deepseek-v2-lite"])
def test_fast_path_with_a_paged_cache_keeps_the_logits(name: str, tiny_checkpoints: dict[str, Path]) -> None:
    """The fast path over a paged KV cache (q/k norm + RoPE + KV store as one kernel, the Triton attention kernel,
    the router GEMM inside the top-k kernel, fused residuals and MLP tails, the triton MoE backend whose top-k sum
    (and DeepSeek's shared-expert add) runs inside the next norm) gives the reference path's logits, for a
    two-sequence prefill and then a decode step that reads what the prefill stored."""
    from moelab.context import ForwardContext, forward_context
    from moelab.models.loader import load_model

    path = tiny_checkpoints[name]
    ref_model, fast_model = load_model(path), load_model(path, moe_backend="triton")
    fast_model.prepare_fast_path(64)
    fast_model.set_attention_impl("triton")
    bs = 4
    tables = torch.tensor([[1, 2, 0], [3, 0, 0]], dtype=torch.int32)
    for m in (ref_model, fast_model):
        for a in m.attention_modules():
            a.kv_cache = torch.zeros(a.cache_shape(6, bs))

    def ctx(qlens: list[int], lens: list[int]) -> ForwardContext:
        pos = [p for q, n in zip(qlens, lens) for p in range(n - q, n)]
        seq = [b for b, q in enumerate(qlens) for _ in range(q)]
        slots = torch.tensor([int(tables[b, p // bs]) * bs + p % bs for b, p in zip(seq, pos)])
        cu = torch.tensor([0] + qlens).cumsum(0).int()
        return ForwardContext(cu_seqlens_q=cu, query_lens=qlens, seq_lens=lens, slot_mapping=slots,
                              block_tables=tables, block_size=bs, seq_lens_t=torch.tensor(lens, dtype=torch.int32),
                              max_query_len=max(qlens), max_seq_len=12), torch.tensor(pos)

    g = torch.Generator().manual_seed(1)
    for qlens, lens in (([7, 3], [7, 3]), ([1, 1], [8, 4])):
        ids = torch.randint(4, 320, (sum(qlens),), generator=g)
        logits = []
        for m in (ref_model, fast_model):
            c, pos = ctx(qlens, lens)
            with torch.no_grad(), forward_context(c):
                logits.append(m.compute_logits(m(ids, pos)))
        want, got = logits
        assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_overlapped_steps_change_nothing(tiny_checkpoints: dict[str, Path]) -> None:
    """async_scheduling (step N+1 planned and launched before step N's tokens reach the host) gives the same
    tokens, finish reasons and stop reasons as settling every step, with EOS, stop strings, seeds, min_tokens,
    chunked prefill and preemption in play, and frees every block."""
    path = str(tiny_checkpoints["olmoe"])
    prompts = [[5, 6, 7], [9] * 21, [11, 12], [13] * 7, [4, 8, 15, 16, 23, 42]]
    base = dict(max_model_len=64, block_size=4, num_kv_blocks=17, max_num_batched_tokens=16)
    probe = LLM(path, async_scheduling=False, **base)
    free = probe.generate(prompts[0], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0]
    eos = free.token_ids[3]
    own = probe.generate(prompts[2], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    ids = own.token_ids[:own.token_ids.index(eos)] if eos in own.token_ids else own.token_ids
    text = probe.tokenizer.decode(ids)  # prompt 2's own greedy text before any EOS: its stop string fires
    stop = next(text[i:i + 2] for i in range(len(text) - 2, 0, -1)  # late in it: prompt 2 runs long, as before
                if "\ufffd" not in text[i:i + 2] and text.find(text[i:i + 2]) == i)
    params = [SamplingParams(temperature=0, max_tokens=12), SamplingParams(temperature=0.9, seed=3, max_tokens=9),
              SamplingParams(temperature=0, max_tokens=10, stop=stop),
              SamplingParams(temperature=1.0, top_k=20, seed=11, max_tokens=7, min_tokens=5),
              SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)]
    results = []
    for overlap in (False, True):
        llm = LLM(path, async_scheduling=overlap, **base)
        llm.engine.eos_token_ids = (eos,)
        outs = llm.generate(prompts, params)
        results.append([(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason) for o in outs])
        eng = llm.engine
        assert eng.block_manager.num_free_blocks == eng.num_blocks - 1 and not eng.has_unfinished_requests()
        assert all(len(o.metrics.token_times) == len(o.outputs[0].token_ids) for o in outs)
        assert eng.scheduler.num_preemptions > 0  # preemption was in play
    assert results[0] == results[1]
    assert {r[1] for r in results[0]} == {"stop", "length"} and results[0][2][1:] == ("stop", stop)


def test_prefill_warmup_runs_single_and_mixed_steps_and_changes_no_output(olmoe: LLM) -> None:
    runner = olmoe.engine.runner
    counts = runner.warmup_token_counts()
    assert counts == sorted(set(counts)) and {2, 16, 64} <= set(counts)
    assert max(counts) <= min(olmoe.config.max_num_batched_tokens, olmoe.engine.max_model_len)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    before = [o.outputs[0].token_ids for o in olmoe.generate([[5, 6, 7], [9] * 20], params)]
    runner.warmup_prefill(force=True)  # writes only the reserved block 0
    olmoe.engine.block_manager.check_invariants([])
    assert [o.outputs[0].token_ids for o in olmoe.generate([[5, 6, 7], [9] * 20], params)] == before


@needs_gpu
def test_launching_a_step_never_waits_for_the_device(tiny_checkpoints: dict[str, Path]) -> None:
    """ModelRunner.launch enqueues a step without a host-device synchronization, for prefill chunks (eager), mixed
    steps and decode steps (CUDA graphs), greedy and sampled: torch's sync debug mode raises on any synchronizing
    call (a pageable copy, .item(), .tolist(), a boolean-mask index). Only collect() may wait. This is what lets
    the host prepare step N+1 while step N runs (a synchronous copy of the logits rows once cost ~20 ms per
    offline run, docs/perf/engine.md v4)."""
    path = str(tiny_checkpoints["olmoe"])
    llm = LLM(path, dtype="bfloat16", device="cuda", max_model_len=64, block_size=4, max_num_batched_tokens=16,
              num_kv_blocks=64)  # not sized from free memory: another test's engine may hold it
    eng = llm.engine
    launch = eng.runner.launch

    def checked(*a, **k):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return launch(*a, **k)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    eng.runner.launch = checked
    prompts = [[5, 6, 7] * 9, [9] * 21, [11, 12], [4, 8, 15]]
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=3, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=0.7, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=0, min_tokens=4, max_tokens=6)]  # EOS banned for 4 tokens
    outs = llm.generate(prompts, params)
    assert [len(o.outputs[0].token_ids) for o in outs][:3] == [6, 6, 6] and len(outs[3].outputs[0].token_ids) >= 4


def test_auto_device_is_the_cpu_under_the_triton_interpreter(monkeypatch) -> None:
    """The interpreter takes CPU tensors only, so "auto" (the engine, the kernel bench, calibration) picks the CPU
    under it even where CUDA is present; the test suite relies on it on GPU machines."""
    from moelab.device import default_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert default_device() == "cpu"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert default_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == "cpu"


def test_what_the_lab_reads(tiny_checkpoints: dict[str, Path]) -> None:
    """The engine's public surface for the lab: MoE layer ids (dense-first layers left out), the top-k in effect,
    the routing recorder only when asked for."""
    path = str(tiny_checkpoints["qwen2-moe-dense-first"])
    plain = LLM(path, max_model_len=32, block_size=4).engine
    assert plain.moe_layer_ids() == [1, 2] and plain.top_k == plain.spec.top_k and plain.routing_recorder is None
    rec = LLM(path, max_model_len=32, block_size=4, record_routing=True, top_k=1).engine
    assert rec.top_k == 1 and rec.routing_recorder is not None


@pytest.mark.parametrize("overlapped", [False, True])
def test_non_finite_logits_end_only_their_request(tiny_checkpoints: dict[str, Path], overlapped: bool) -> None:
    """reliability.md F3: a row of NaN (or infinite) logits ends its request with finish_reason "error" instead of a
    garbage token; the other requests finish as usual, nothing is leaked, the engine keeps serving the same tokens.
    With overlapped steps the next step is already launched with the bad row's token fed back on the device: it
    gets a valid id (0) there, and its result is dropped."""
    llm = LLM(str(tiny_checkpoints["olmoe"]), max_model_len=64, block_size=4, async_scheduling=overlapped)
    eng = llm.engine
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13]]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    before = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    real, calls = eng.model.compute_logits, []

    def poisoned(hidden):  # call 1: the prefill of all three, then one decode step per call
        out = real(hidden)
        calls.append(out.shape[0])
        if len(calls) in (3, 4):  # spoil the first row: sequence 0 (NaN), then sequence 1 (+inf)
            out = out.clone()
            out[0, 3] = float("nan") if len(calls) == 3 else float("inf")
        return out

    eng.model.compute_logits = poisoned
    try:
        got = [o.outputs[0] for o in llm.generate(prompts, params)]
    finally:
        del eng.model.compute_logits
    assert got[0].finish_reason == "error" and got[0].stop_reason == "non-finite logits"
    assert got[0].token_ids == before[0][:2] and got[2].token_ids == before[2] and got[2].finish_reason == "length"
    if not overlapped:  # call 4's first row is sequence 1 (with overlap it is still sequence 0's dropped step)
        assert got[1].finish_reason == "error" and got[1].token_ids == before[1][:3]
        assert eng.stats()["num_nonfinite"] == 2
    assert eng.block_manager.num_free_blocks == eng.num_blocks - 1 and not eng.requests
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == before


def test_sampled_rows_are_checked_too(tiny_checkpoints: dict[str, Path]) -> None:
    from moelab.engine.sampler import SamplingBatch, sample

    logits = torch.randn(3, 50)
    logits[1, 7] = float("nan")
    b = SamplingBatch(temperature=torch.tensor([0.0, 0.9, 0.9]), top_k=torch.zeros(3, dtype=torch.long),
                      top_p=torch.ones(3), generators=[None] * 3, banned=[[], [], []], all_greedy=False,
                      any_top_k=False, any_top_p=False)
    ids, fed = sample(logits, b)
    assert ids[1] == -1 and fed[1] == 0 and ids[0] == logits[0].argmax() and 0 <= ids[2] < 50
    assert torch.equal(ids[[0, 2]], fed[[0, 2]])


def test_qwen2_shared_gate_stays_apart_without_a_spare_router_column(tiny_checkpoints: dict[str, Path]) -> None:
    """64 experts fill the router's block: one more row would double it (and change the routing's sums), so the
    gate keeps its own GEMV there."""
    from moelab.models import qwen2_moe
    from moelab.models.loader import load_model

    model = load_model(tiny_checkpoints["qwen2-moe-shared-e6"], moe_backend="triton")
    block = next(m for m in model.modules() if isinstance(m, qwen2_moe.Qwen2MoeBlock))
    D = block.gate.weight.shape[1]
    with torch.no_grad():
        block.gate.weight = torch.nn.Parameter(torch.randn(64, D), requires_grad=False)
        block.use_fused_routing()
    assert block.gate_rows is None and len(block.route(torch.randn(2, D))) == 2


def test_without_chunked_prefill_the_step_budget_must_hold_a_whole_prompt(tiny_checkpoints: dict[str, Path]) -> None:
    """With chunked prefill off a prompt runs in one step: a budget below the (resolved) context length is refused
    at build time instead of leaving a long prompt waiting forever; within it, prompts run whole."""
    path = str(tiny_checkpoints["olmoe"])
    with pytest.raises(ValueError, match="without chunked prefill max_num_batched_tokens \\(16\\) must be >="):
        LLM(path, enable_chunked_prefill=False, max_num_batched_tokens=16)
    llm = LLM(path, enable_chunked_prefill=False, max_num_batched_tokens=64, max_model_len=64)
    chunked = LLM(path, max_num_batched_tokens=8, max_model_len=64)
    p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompts = [list(range(5, 25)), list(range(30, 37))]
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, p)] == \
        [o.outputs[0].token_ids for o in chunked.generate(prompts, p)]


def test_top_k_and_top_p_reach_the_sampler(olmoe: LLM) -> None:
    """At temperature 1, top_k=1 and a tiny top_p leave only the most likely token: the output is the greedy one
    (a top_k or top_p lost on the way to the sampler would sample other tokens)."""
    prompts = [[5, 6, 7], [9, 10, 11, 12]]
    greedy = [o.outputs[0].token_ids for o in olmoe.generate(prompts, SamplingParams(
        temperature=0, max_tokens=8, ignore_eos=True))]
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        for seed in (1, 2):
            p = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=seed, **kw)
            assert [o.outputs[0].token_ids for o in olmoe.generate(prompts, p)] == greedy, kw
    free = [o.outputs[0].token_ids for o in olmoe.generate(prompts, SamplingParams(
        temperature=1.0, max_tokens=8, ignore_eos=True, seed=1))]
    assert free != greedy  # the check can fail: unfiltered sampling at temperature 1 leaves the greedy path
