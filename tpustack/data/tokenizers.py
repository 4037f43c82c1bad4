"""Tokenizers: bytes by default (no download, 1 token = 1 byte), or a HF tokenizer.json."""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from tpustack import paths
from tpustack.errors import UserError


class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; BOS=256, EOS=257."""

    vocab_size = 258
    bos_id = 256
    eos_id = 257
    name = "byte"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json, local or remote (read as text, no temp file)."""

    def __init__(self, path: str):
        self.name = self.path = path  # path: where exports copy the tokenizer.json from
        self._tok = Tokenizer.from_str(paths.read_bytes(path).decode("utf-8"))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.bos_id = next((vocab[t] for t in ("<s>", "<|begin_of_text|>", "<bos>") if t in vocab), None)
        self.eos_id = next((vocab[t] for t in ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>")
                            if t in vocab), None)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def load_tokenizer(spec: str):
    """`byte` or a path or gs:// URL to a tokenizer.json (or a directory holding one)."""
    if spec == "byte":
        return ByteTokenizer()
    path = paths.join(spec, "tokenizer.json") if paths.isdir(spec) else spec
    if not paths.isfile(path):
        raise UserError(f"config.data.tokenizer: no tokenizer.json at {spec!r}; use 'byte' or a path")
    return HFTokenizer(path)
