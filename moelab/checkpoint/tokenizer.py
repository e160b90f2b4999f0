"""A small byte-level BPE tokenizer, trained deterministically on a corpus shipped with moelab.

Synthetic checkpoints carry it so that every tool that expects `tokenizer.json` (transformers, vLLM,
SGLang, our server) can load them. Byte-level: any text round-trips.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
EOS_ID, PAD_ID = 0, 1
DEFAULT_VOCAB = 512

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(vocab_size: int = DEFAULT_VOCAB) -> Tokenizer:
    corpus = resources.files("moelab.checkpoint").joinpath("data/corpus.txt").read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus.splitlines(), trainer=trainer)
    return tok


def synthetic_tokenizer(model_vocab_size: int) -> Tokenizer:
    """The tokenizer of a synthetic model: the small BPE for the first ids, then one filler word per id up to the
    model's vocab (" w512", " w513", ...), so that every id the model can sample decodes to text. Without the
    fillers a random model's tokens (mostly ids past the BPE's 512) decode to "", and a streaming server has no
    text to send until the request ends: a serving benchmark would then see one chunk per request."""
    tok = build_tokenizer(min(DEFAULT_VOCAB, model_vocab_size))
    n = tok.get_vocab_size()
    if model_vocab_size > n:
        tok.add_tokens([AddedToken(f" w{i}", normalized=False) for i in range(n, model_vocab_size)])
    return tok


def save_tokenizer(out_dir: Path, model_vocab_size: int) -> Tokenizer:
    """Write tokenizer.json and tokenizer_config.json; the tokenizer has exactly the model's vocab."""
    tok = synthetic_tokenizer(model_vocab_size)
    tok.save(str(out_dir / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 20,
        "bos_token": None, "eos_token": SPECIAL_TOKENS[EOS_ID], "pad_token": SPECIAL_TOKENS[PAD_ID],
        "unk_token": None, "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return tok
