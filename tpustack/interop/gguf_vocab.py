"""Tokenizers <-> GGUF `tokenizer.ggml.*` metadata, in the form llama.cpp's loader reads.

Both tokenizers tpustack trains with are byte-level BPE, which GGUF calls model "gpt2":
  byte  ByteTokenizer: the 256 GPT-2 byte symbols as tokens 0..255 (so byte b is token b),
        `<s>`/`</s>` as control tokens 256/257, no merges; pre "gpt-2" (with no merges the
        split cannot change a token).
  hf    a tokenizer.json BPE model over ByteLevel: its vocab, merges and special tokens; the
        `tokenizer.ggml.pre` is read off its pre-tokenizer (GPT-2's regex -> "gpt-2",
        Llama 3's -> "llama-bpe"); any other is refused rather than guessed.
Rows past the tokenizer's vocab up to cfg.vocab_size are `[PAD{i}]`, type UNUSED.

llama.cpp refuses a "gpt2" vocab without a merges array and gguf cannot write an empty one,
so the byte vocab carries one merge, "<s> </s>", that never fires: merges pair symbols of
the byte-level text, and control tokens are never such symbols.

Reading back: the byte vocab (as written above) is a ByteTokenizer; any other "gpt2" vocab
becomes a tokenizer.json rebuilt from tokens, merges and pre (an HFTokenizer).
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from typing import Any

import gguf

from tpustack import paths
from tpustack.data import ByteTokenizer, HFTokenizer
from tpustack.data.chat import DEFAULT_CHAT_TEMPLATE, load_chat_template
from tpustack.errors import UserError
from tpustack.interop.tokenizer_json import BOS, BOS_ID, EOS, EOS_ID, byte_symbols

# The pre-tokenizer regexes of tokenizer.json files llama.cpp knows by name.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_NO_MERGE = f"{BOS} {EOS}"


def _byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": use_regex}


_PRE_TOKENIZERS = {  # tokenizer.ggml.pre -> the tokenizer.json pre_tokenizer it stands for
    "gpt-2": _byte_level(True),
    "llama-bpe": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
        _byte_level(False)]},
}


def pre_name(pre_tokenizer: dict | None, has_merges: bool = True) -> str:
    """The llama.cpp pre-tokenizer name of a tokenizer.json pre_tokenizer; a UserError if none fits.

    Without merges every byte is its own token whatever the split, so plain ByteLevel (the
    byte tokenizer's tokenizer.json) is "gpt-2" too."""
    pre = pre_tokenizer or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and (steps[0].get("use_regex", True) or not has_merges):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == LLAMA3_REGEX:
        return "llama-bpe"
    raise UserError(f"tokenizer.json pre_tokenizer {json.dumps(pre)[:120]}: not one llama.cpp names (GPT-2's "
                    "ByteLevel regex or Llama 3's Split); export with the byte tokenizer or such a BPE")


def vocab_metadata(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """{tokens, types, merges, pre, bos, eos} for a ByteTokenizer or a byte-level BPE HFTokenizer."""
    if isinstance(tokenizer, ByteTokenizer):
        tokens = byte_symbols() + [BOS, EOS]
        types = [gguf.TokenType.NORMAL] * 256 + [gguf.TokenType.CONTROL] * 2
        meta = {"merges": [_NO_MERGE], "pre": "gpt-2", "bos": BOS_ID, "eos": EOS_ID}
    elif isinstance(tokenizer, HFTokenizer):
        spec = json.loads(paths.read_text(tokenizer.path))
        model = spec.get("model", {})
        if model.get("type") != "BPE" or model.get("byte_fallback"):
            raise UserError(f"tokenizer {tokenizer.path!r}: model {model.get('type')!r}; GGUF export takes "
                            "byte-level BPE (byte_fallback off)")
        by_id = {i: t for t, i in model["vocab"].items()}
        special = {}
        for added in spec.get("added_tokens", []):
            by_id[added["id"]] = added["content"]
            special[added["id"]] = added.get("special", True)
        n = max(by_id) + 1
        tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
        types = [gguf.TokenType.UNUSED if i not in by_id else gguf.TokenType.CONTROL if special.get(i)
                 else gguf.TokenType.USER_DEFINED if i in special else gguf.TokenType.NORMAL for i in range(n)]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        meta = {"merges": merges or [_NO_MERGE], "pre": pre_name(spec.get("pre_tokenizer"), bool(merges)),
                "bos": tokenizer.bos_id, "eos": tokenizer.eos_id}
    else:
        raise UserError(f"tokenizer {type(tokenizer).__name__}: GGUF export takes the byte tokenizer or a "
                        "Hugging Face tokenizer.json")
    if len(tokens) > vocab_size:
        raise UserError(f"tokenizer: {len(tokens)} tokens but model.vocab_size is {vocab_size}")
    pad = range(len(tokens), vocab_size)
    return {**meta, "tokens": tokens + [f"[PAD{i}]" for i in pad],
            "types": [int(t) for t in types] + [int(gguf.TokenType.UNUSED)] * len(pad)}


def add_vocab(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int) -> None:
    """The tokenizer.ggml.* keys of `tokenizer`; encode adds no BOS/EOS, so neither does llama.cpp."""
    meta = vocab_metadata(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["types"])
    writer.add_token_merges(meta["merges"])
    if meta["bos"] is not None:
        writer.add_bos_token_id(meta["bos"])
    if meta["eos"] is not None:
        writer.add_eos_token_id(meta["eos"])
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


def chat_template_of(tokenizer: Any) -> str | None:
    """The template an HF export would carry (tpustack.interop.tokenizer_json): an HF tokenizer's own
    (tokenizer_config.json / chat_template.jinja beside its tokenizer.json), else the server's default."""
    if isinstance(tokenizer, HFTokenizer):
        return load_chat_template(posixpath.dirname(tokenizer.path) or ".")[0] or DEFAULT_CHAT_TEMPLATE
    return DEFAULT_CHAT_TEMPLATE if isinstance(tokenizer, ByteTokenizer) else None


def field_value(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    """A metadata value of a GGUF file (a list for arrays), or `default` when the key is absent."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_vocab(reader: gguf.GGUFReader) -> Any:
    """The tokenizer a GGUF file's metadata describes: ByteTokenizer, HFTokenizer, or None when it has none."""
    model = field_value(reader, "tokenizer.ggml.model")
    if model is None:
        return None
    if model != "gpt2":
        raise UserError(f"GGUF tokenizer.ggml.model {model!r}: only byte-level BPE ('gpt2') is read; "
                        "pass the weights with a tokenizer.json instead")
    tokens, merges = field_value(reader, "tokenizer.ggml.tokens"), field_value(reader, "tokenizer.ggml.merges", [])
    types = field_value(reader, "tokenizer.ggml.token_type", [gguf.TokenType.NORMAL] * len(tokens))
    bos, eos = field_value(reader, "tokenizer.ggml.bos_token_id"), field_value(reader, "tokenizer.ggml.eos_token_id")
    if tokens[:258] == byte_symbols() + [BOS, EOS] and merges == [_NO_MERGE] and (bos, eos) == (BOS_ID, EOS_ID):
        return ByteTokenizer()
    pre = field_value(reader, "tokenizer.ggml.pre", "gpt-2")
    if pre == "default":
        pre = "gpt-2"
    if pre not in _PRE_TOKENIZERS:
        raise UserError(f"GGUF tokenizer.ggml.pre {pre!r}: only {', '.join(_PRE_TOKENIZERS)} are read")
    return HFTokenizer(_write_json(_tokenizer_json(tokens, types, merges, _PRE_TOKENIZERS[pre])))


def _tokenizer_json(tokens: list[str], types: list[int], merges: list[str], pre: dict) -> dict:
    """A tokenizer.json over the GGUF vocab: CONTROL/USER_DEFINED tokens are also added tokens."""
    added_types = (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": types[i] == gguf.TokenType.CONTROL}
             for i, t in enumerate(tokens) if types[i] in added_types]
    # Added tokens stay in the model's vocab too (as tokenizers writes them), or they would get new ids.
    vocab = {t: i for i, t in enumerate(tokens) if types[i] != gguf.TokenType.UNUSED}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": pre, "post_processor": None, "decoder": _byte_level(True),
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": vocab,
                      "merges": [m.split(" ", 1) for m in merges if m != _NO_MERGE]}}


def _write_json(spec: dict) -> str:
    """A file for HFTokenizer, which is built from a path (and exports copy that file)."""
    fd, path = tempfile.mkstemp(prefix="tpustack-gguf-", suffix=".tokenizer.json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)
    return path
