"""Token sources: the built-in corpus, text / jsonl files, pre-tokenized .bin token arrays.

Every source becomes one flat token stream per split (train / heldout). Text documents are
split by a hash of their name relative to data.path, so the held-out set is the same on every
run and host, and the same whether the files are read locally or from gs:// (or from another
working directory). Data paths go through tpustack.paths: local or gs://. A local .bin is a
np.memmap; a remote one is a `RangeTokens`, read by byte ranges, never downloaded whole.
"""

from __future__ import annotations

import json
import os
import re
import sysconfig
import zlib
from typing import Iterator

import numpy as np

from tpustack import paths
from tpustack.config import DataConfig
from tpustack.errors import UserError

# The Python standard library's own source: present on every machine with Python, no download.
_BUILTIN_SKIP = ("site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3")


def builtin_documents() -> Iterator[tuple[str, str]]:
    """(name, text) of every stdlib .py file outside tests and site-packages, in sorted order."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):  # the local stdlib, never a user path
        dirnames[:] = sorted(d for d in dirnames if d not in _BUILTIN_SKIP)
        files += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    for path in sorted(files):
        with open(path, encoding="utf-8", errors="replace") as f:
            yield os.path.relpath(path, root), f.read()


# Text of another kind than the built-in corpus, for fine-tuning on data the base never saw
# (tpustack finetune): the stdlib's prose, docs and data files, tests and site-packages included.
_BUILTIN_TEXT_SUFFIXES = (".txt", ".rst", ".html")


def builtin_text_documents() -> Iterator[tuple[str, str]]:
    """(name, text) of every stdlib .txt/.rst/.html file outside site-packages (no .py), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):  # the local stdlib, never a user path
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        files += [os.path.join(dirpath, f) for f in filenames if f.endswith(_BUILTIN_TEXT_SUFFIXES)]
    for path in sorted(files):
        with open(path, encoding="utf-8", errors="replace") as f:
            yield os.path.relpath(path, root), f.read()


_MAGIC = re.compile(r"[*?[]")


def _expand(path: str, suffixes: tuple[str, ...]) -> list[tuple[str, str]]:
    """(path, name) of each file a directory (recursively), a glob or a file names; sorted.

    The name is the path relative to the directory, or to the glob's last literal directory.
    """
    if paths.isdir(path):
        root, found = path, [f for f in paths.find(path) if f.endswith(suffixes)]
    else:
        literal = path.split("/")
        literal = literal[:next((i for i, p in enumerate(literal) if _MAGIC.search(p)), len(literal) - 1)]
        root, found = "/".join(literal), paths.glob(path)
    if not found:
        raise UserError(f"config.data.path: no {'/'.join(suffixes)} files at {path!r}")
    return [(f, paths.relative(f, root) if root else f) for f in sorted(found)]


def text_documents(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    for path, name in _expand(cfg.path, (".txt", ".md", ".py", ".text")):
        yield name, paths.read_text(path, errors="replace")


def jsonl_documents(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    """One JSON object per line with a "text" field."""
    for path, name in _expand(cfg.path, (".jsonl", ".json")):
        with paths.open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(f"config.data.path: {path}:{lineno} is not a JSON object with a "
                                    f"'text' field") from None
                yield f"{name}:{lineno}", text


def is_heldout(name: str, fraction: float) -> bool:
    return (zlib.crc32(name.encode()) % 10_000) < fraction * 10_000


def load_tokens(cfg: DataConfig, tokenizer) -> dict[str, np.ndarray]:
    """{"train": tokens, "heldout": tokens}: flat integer arrays (a .bin: np.memmap, or RangeTokens on gs://)."""
    if cfg.source == "bin":
        return _bin_tokens(cfg)
    documents = {"builtin": builtin_documents, "builtin_text": builtin_text_documents, "text": text_documents,
                 "jsonl": jsonl_documents}
    docs = documents[cfg.source]() if cfg.source.startswith("builtin") else documents[cfg.source](cfg)
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
    if paths.isdir(cfg.path):
        train = paths.join(cfg.path, "train.bin")
        held = next((paths.join(cfg.path, n) for n in ("heldout.bin", "val.bin")
                     if paths.exists(paths.join(cfg.path, n))), None)
        if not paths.exists(train) or held is None:
            raise UserError(f"config.data.path: {cfg.path} needs train.bin and heldout.bin (or val.bin)")
        return {"train": _token_file(train, cfg.bin_dtype), "heldout": _token_file(held, cfg.bin_dtype)}
    if not paths.isfile(cfg.path):
        raise UserError(f"config.data.path: no such .bin file {cfg.path!r}")
    tokens = _token_file(cfg.path, cfg.bin_dtype)
    cut = int(len(tokens) * (1 - cfg.heldout_fraction))
    return {"train": tokens[:cut], "heldout": tokens[cut:]}


def _token_file(path: str, dtype: str):
    if paths.is_remote(path):
        return RangeTokens(path, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class RangeTokens:
    """A remote .bin of token ids that reads only the elements it is indexed with.

    Stands in for the np.memmap of a local file where the Batcher uses one: len(), a slice
    (a view, nothing read) and an integer-array index (one concurrent range request per
    contiguous run of the indices: a host's rows of a batch). np.asarray() reads it all.
    """

    def __init__(self, path: str, dtype: str, start: int = 0, stop: int | None = None):
        self.path, self.dtype = path, np.dtype(dtype)
        if stop is None:
            nbytes = paths.size(path)
            if nbytes % self.dtype.itemsize:
                raise UserError(f"config.data.path: {path} holds {nbytes} bytes, not a whole number of "
                                f"{dtype} tokens; check data.bin_dtype")
            stop = nbytes // self.dtype.itemsize
        self._start, self._stop = start, stop

    def __len__(self) -> int:
        return self._stop - self._start

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise IndexError("RangeTokens: slices with a step are not supported")
            return RangeTokens(self.path, self.dtype.name, self._start + start, self._start + max(start, stop))
        index = np.asarray(index)
        if index.dtype.kind not in "iu":
            raise IndexError(f"RangeTokens: cannot index with {index.dtype}")
        flat = np.where(index < 0, index + len(self), index).ravel().astype(np.int64)
        if flat.size == 0:
            return np.zeros(index.shape, self.dtype)
        if flat.min() < 0 or flat.max() >= len(self):
            raise IndexError(f"RangeTokens: index out of range for {len(self)} tokens")
        unique = np.unique(flat)
        breaks = np.flatnonzero(np.diff(unique) != 1) + 1
        first, last = unique[np.r_[0, breaks]], unique[np.r_[breaks - 1, len(unique) - 1]]
        values = self._read(first, last + 1)  # the runs in order: values[i] is unique[i]
        out = values[np.searchsorted(unique, flat)].reshape(index.shape)
        return out[()] if index.ndim == 0 else out

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self._read([0], [len(self)]), dtype=dtype)

    def _read(self, starts, stops) -> np.ndarray:
        """Tokens [start, stop) of each run, concatenated."""
        size = self.dtype.itemsize
        starts, stops = np.asarray(starts, np.int64), np.asarray(stops, np.int64)
        blobs = paths.read_ranges(self.path, (self._start + starts) * size, (stops - starts) * size)
        return np.frombuffer(b"".join(blobs), self.dtype)
