"""Token sources: the built-in corpus, text / jsonl files, pre-tokenized .bin memmaps.

Every source becomes one flat token stream per split (train / heldout). Text documents are
split by a hash of their name, so the held-out set is the same on every run and host.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
import zlib
from typing import Iterator

import numpy as np

from tpustack.config import DataConfig
from tpustack.errors import UserError

# The Python standard library's own source: present on every machine with Python, no download.
_BUILTIN_SKIP = ("site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3")


def builtin_documents() -> Iterator[tuple[str, str]]:
    """(name, text) of every stdlib .py file outside tests and site-packages, in sorted order."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _BUILTIN_SKIP)
        paths += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    for path in sorted(paths):
        with open(path, encoding="utf-8", errors="replace") as f:
            yield os.path.relpath(path, root), f.read()


def _expand(path: str, suffixes: tuple[str, ...]) -> list[str]:
    if os.path.isdir(path):
        found = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(suffixes)]
    else:
        found = glob.glob(path)
    if not found:
        raise UserError(f"config.data.path: no {'/'.join(suffixes)} files at {path!r}")
    return sorted(found)


def text_documents(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    for path in _expand(cfg.path, (".txt", ".md", ".py", ".text")):
        with open(path, encoding="utf-8", errors="replace") as f:
            yield path, f.read()


def jsonl_documents(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    """One JSON object per line with a "text" field."""
    for path in _expand(cfg.path, (".jsonl", ".json")):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(f"config.data.path: {path}:{lineno} is not a JSON object with a "
                                    f"'text' field") from None
                yield f"{path}:{lineno}", text


def is_heldout(name: str, fraction: float) -> bool:
    return (zlib.crc32(name.encode()) % 10_000) < fraction * 10_000


def load_tokens(cfg: DataConfig, tokenizer) -> dict[str, np.ndarray]:
    """{"train": tokens, "heldout": tokens} as flat integer arrays (memmaps for .bin)."""
    if cfg.source == "bin":
        return _bin_tokens(cfg)
    documents = {"builtin": builtin_documents, "text": text_documents, "jsonl": jsonl_documents}
    docs = documents[cfg.source]() if cfg.source == "builtin" else documents[cfg.source](cfg)
    splits: dict[str, list[np.ndarray]] = {"train": [], "heldout": []}
    total = 0
    eos = getattr(tokenizer, "eos_id", None)
    for name, text in docs:
        ids = tokenizer.encode(text)
        if eos is not None:
            ids = np.append(ids, eos)
        splits["heldout" if is_heldout(name, cfg.heldout_fraction) else "train"].append(ids)
        total += len(text)
        if total >= cfg.max_bytes:
            break
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    out = {k: np.concatenate(v).astype(dtype) if v else np.zeros(0, dtype) for k, v in splits.items()}
    if len(out["heldout"]) == 0 or len(out["train"]) == 0:
        # too few documents for a split by name: hold out the tail of the whole stream
        stream = np.concatenate([out["train"], out["heldout"]])
        cut = int(len(stream) * (1 - cfg.heldout_fraction))
        out = {"train": stream[:cut], "heldout": stream[cut:]}
    for split, tokens in out.items():
        if len(tokens) < 2:
            raise UserError(f"config.data: the {split} split of {cfg.source!r} holds {len(tokens)} tokens; "
                            f"add data or change data.heldout_fraction")
    return out


def _bin_tokens(cfg: DataConfig) -> dict[str, np.ndarray]:
    """A .bin file (or train.bin + heldout.bin / val.bin in a directory) of uint16/uint32 ids."""
    if cfg.bin_dtype not in ("uint16", "uint32"):
        raise UserError(f"config.data.bin_dtype: {cfg.bin_dtype!r} is not uint16 or uint32")
    if os.path.isdir(cfg.path):
        train = os.path.join(cfg.path, "train.bin")
        held = next((os.path.join(cfg.path, n) for n in ("heldout.bin", "val.bin")
                     if os.path.exists(os.path.join(cfg.path, n))), None)
        if not os.path.exists(train) or held is None:
            raise UserError(f"config.data.path: {cfg.path} needs train.bin and heldout.bin (or val.bin)")
        return {"train": np.memmap(train, dtype=cfg.bin_dtype, mode="r"),
                "heldout": np.memmap(held, dtype=cfg.bin_dtype, mode="r")}
    if not os.path.isfile(cfg.path):
        raise UserError(f"config.data.path: no such .bin file {cfg.path!r}")
    tokens = np.memmap(cfg.path, dtype=cfg.bin_dtype, mode="r")
    cut = int(len(tokens) * (1 - cfg.heldout_fraction))
    return {"train": tokens[:cut], "heldout": tokens[cut:]}
