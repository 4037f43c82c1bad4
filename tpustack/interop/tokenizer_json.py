"""The byte tokenizer (tpustack.data.ByteTokenizer) as a Hugging Face tokenizer.json.

ByteTokenizer: UTF-8 byte b is token b (0..255), BOS 256, EOS 257, and encode adds
neither. The same map in `tokenizers` terms: a BPE model without merges over the 256
GPT-2 byte-level symbols (ByteLevel pre-tokenizer and decoder, which turn bytes into those
symbols and back), so every byte is one token whose id is the byte's value; `<s>` and
`</s>` are special added tokens 256 and 257, and there is no post-processor, so
`add_special_tokens` adds nothing, as in ByteTokenizer.encode. The pre-tokenizer runs
without its regex split (use_regex False) and without a prefix space: with no merges a
split changes nothing, and a prefix space would add a byte.

One difference is inherent to `tokenizers`: added tokens are matched in the text, so the
literal string "<s>" encodes as 256 where ByteTokenizer gives its three bytes. The switch
that turns this off (`Tokenizer.encode_special_tokens`) is not stored in tokenizer.json:
`byte_tokenizer()` sets it, and tokenizer_config.json carries `split_special_tokens: true`,
which transformers applies on load. A bare `Tokenizer.from_file` differs only on text
holding "<s>" or "</s>".
"""

from __future__ import annotations

import json
from typing import Any

from tokenizers import Tokenizer

BOS, EOS = "<s>", "</s>"
BOS_ID, EOS_ID = 256, 257


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255 (the ByteLevel alphabet), by byte value."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:  # unprintable bytes take code points from 256 up, in byte order
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def _added(token_id: int, content: str) -> dict[str, Any]:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False, "special": True}


def byte_tokenizer_json() -> dict[str, Any]:
    """The tokenizer.json dict of the byte tokenizer."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added(BOS_ID, BOS), _added(EOS_ID, EOS)],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": None,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {s: b for b, s in enumerate(byte_symbols())}, "merges": [],
        },
    }


def byte_tokenizer() -> Tokenizer:
    """A `tokenizers.Tokenizer` that encodes and decodes exactly as ByteTokenizer does."""
    tok = Tokenizer.from_str(json.dumps(byte_tokenizer_json()))
    tok.encode_special_tokens = True  # "<s>" in text is three bytes, as in ByteTokenizer
    return tok


def byte_tokenizer_config(chat_template: str | None = None, model_max_length: int | None = None) -> dict:
    """tokenizer_config.json for the byte tokenizer (transformers' PreTrainedTokenizerFast)."""
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
        "add_bos_token": False, "add_eos_token": False,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"}
                                 for t in byte_tokenizer_json()["added_tokens"]},
    }
    if model_max_length:
        config["model_max_length"] = model_max_length
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config
