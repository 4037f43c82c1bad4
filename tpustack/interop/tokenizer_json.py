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
import posixpath
from typing import Any

from tokenizers import Tokenizer

from tpustack import paths
from tpustack.data import ByteTokenizer, HFTokenizer
from tpustack.data.chat import DEFAULT_CHAT_TEMPLATE, load_chat_template

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


# What a Hugging Face tokenizer directory may hold beside tokenizer.json; copied as they are.
_TOKENIZER_COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def write_tokenizer_files(tokenizer: Any, out: str, model_max_length: int) -> list[str]:
    """The tokenizer files of an HF export into `out`; returns the paths written.

    The byte tokenizer: tokenizer.json and a tokenizer_config.json carrying the default chat
    template. An HF tokenizer: its tokenizer.json and the companions its directory had, as
    they came; a tokenizer_config.json is written when it had none, and the default chat
    template as chat_template.jinja when it had no template of its own."""
    if isinstance(tokenizer, ByteTokenizer):
        files = {"tokenizer.json": json.dumps(byte_tokenizer_json(), ensure_ascii=False, indent=1),
                 "tokenizer_config.json": json.dumps(byte_tokenizer_config(DEFAULT_CHAT_TEMPLATE, model_max_length),
                                                     indent=2)}
        for name, text in files.items():
            paths.write_text(paths.join(out, name), text)
        return [paths.join(out, name) for name in files]
    if not isinstance(tokenizer, HFTokenizer):
        return []  # a checkpoint without a tokenizer exports without one
    source = posixpath.dirname(tokenizer.path) or "."
    written, data = [paths.join(out, "tokenizer.json")], paths.read_bytes(tokenizer.path)
    paths.write_bytes(written[0], data)
    for name in _TOKENIZER_COMPANIONS:
        if paths.isfile(paths.join(source, name)):
            written.append(paths.join(out, name))
            paths.write_bytes(written[-1], paths.read_bytes(paths.join(source, name)))
    if not paths.isfile(paths.join(source, "tokenizer_config.json")):
        hf = Tokenizer.from_str(data.decode("utf-8"))
        token = lambda i: None if i is None else hf.id_to_token(i)  # noqa: E731
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token(tokenizer.bos_id),
                  "eos_token": token(tokenizer.eos_id), "clean_up_tokenization_spaces": False,
                  "model_max_length": model_max_length}
        written.append(paths.join(out, "tokenizer_config.json"))
        paths.write_text(written[-1], json.dumps(config, indent=2))
    if load_chat_template(source)[0] is None:
        written.append(paths.join(out, "chat_template.jinja"))
        paths.write_text(written[-1], DEFAULT_CHAT_TEMPLATE)
    return written
