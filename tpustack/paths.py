"""The one path layer: every user path (workdir, checkpoints, logs, data, tokenizers, exports)
may be local or a URL (gs://, and whatever else etils epath knows: s3://, az://, hf://).

Local paths go to the standard library exactly as before (same strings, same errors, np.memmap
stays possible); remote paths go to etils epath, which orbax uses too, and through it to fsspec
(gcsfs for gs://). Functions take str or os.PathLike and return str paths, so a result can go
into a config, a log line or a library that wants a string; `as_path` gives an `epath.Path` for
those that take one (orbax).

Cloud Storage has no directories and no partial writes: `isdir` is true for any prefix that
has objects under it, `makedirs` is a no-op there, and a write replaces the whole object when
the file is closed. Large remote files are read by byte ranges (`read_ranges`), never mapped.

Many hosts share one gs:// workdir, so nothing here may answer from a stale listing: gcsfs
caches every directory listing per process and then answers `exists`/`info` for anything
under that directory from the cache, so an object another host wrote after the listing
reads as missing (an orbax step or commit marker, a checkpoint another job wrote). Importing
this module turns gcsfs's listings cache off (fsspec's config for the gcs protocol, which
orbax's etils epath reads too) unless the user configured it (FSSPEC_GCS_USE_LISTINGS_CACHE).
"""

from __future__ import annotations

import builtins
import contextlib
import glob as _glob
import io
import os
import posixpath
import re
import tempfile
from typing import IO, Iterator, Sequence

from etils import epath

from tpustack.errors import UserError

Path = epath.Path
PathLike = str | os.PathLike

_REMOTE_SCHEMES = ("gs", "s3", "az", "hf")  # what etils epath routes to fsspec
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _no_listings_cache() -> None:
    try:
        import fsspec.config
    except ImportError:  # no gcs extra: nothing remote can be opened anyway
        return
    conf = fsspec.config.conf
    if not any("use_listings_cache" in conf.get(p, {}) for p in ("gs", "gcs")):
        conf.setdefault("gcs", {})["use_listings_cache"] = False


_no_listings_cache()


def is_remote(path: PathLike) -> bool:
    """True for a URL such as gs://bucket/dir; UserError for a scheme the layer cannot open."""
    match = _SCHEME.match(os.fspath(path))
    if match is None:
        return False
    if match.group(1) not in _REMOTE_SCHEMES:
        raise UserError(f"path {os.fspath(path)!r}: unsupported scheme {match.group(1)!r}; use a local "
                        f"path or one of {', '.join(s + '://' for s in _REMOTE_SCHEMES)}")
    return True


def as_path(path: PathLike) -> Path:
    """An etils epath.Path (local or remote) for libraries that take one, such as orbax."""
    is_remote(path)  # rejects unknown schemes instead of making them relative local paths
    return epath.Path(path)


def join(path: PathLike, *parts: str) -> str:
    """`path/part/...` as a string; local paths join exactly as os.path.join does."""
    path = os.fspath(path)
    return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def exists(path: PathLike) -> bool:
    return as_path(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: PathLike) -> bool:
    """A local directory, or a remote prefix with at least one object under it."""
    return as_path(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path: PathLike) -> bool:
    return as_path(path).is_file() if is_remote(path) else os.path.isfile(path)


def makedirs(path: PathLike) -> None:
    """mkdir -p; a no-op on object stores, where a directory exists once something is in it."""
    if is_remote(path):
        as_path(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def size(path: PathLike) -> int:
    """Size of a file in bytes."""
    return as_path(path).stat().length if is_remote(path) else os.path.getsize(path)


def glob(pattern: PathLike) -> list[str]:
    """Sorted matches of a glob pattern: `data/*.txt`, `gs://bucket/dir/*.txt`, `gs://b/**/*.json`.

    `**` matches any number of directories, zero included, locally as in fsspec.
    """
    pattern = os.fspath(pattern)
    if not is_remote(pattern):
        return sorted(_glob.glob(pattern, recursive=True))
    scheme = _SCHEME.match(pattern).group(0)
    return sorted(scheme + p for p in _fs(pattern).glob(pattern))


def find(root: PathLike) -> list[str]:
    """Every file under a directory, recursively, sorted (one flat listing on an object store)."""
    root = os.fspath(root)
    if not is_remote(root):
        return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files)
    scheme = _SCHEME.match(root).group(0)
    return sorted(scheme + p for p in _fs(root).find(root) if not p.endswith("/"))


def relative(path: PathLike, root: PathLike) -> str:
    """`path` relative to the directory `root` (both as given, local or remote)."""
    path, root = os.fspath(path), os.fspath(root)
    if is_remote(path):
        prefix = root.rstrip("/") + "/"
        return path[len(prefix):] if path.startswith(prefix) else path
    return os.path.relpath(path, root)


def open(path: PathLike, mode: str = "r", *, encoding: str = "utf-8",  # noqa: A001
         errors: str | None = None) -> IO:
    """Like builtins.open (text or binary, read or write) for local and remote paths."""
    if not is_remote(path):
        if "b" in mode:
            return builtins.open(path, mode)
        return builtins.open(path, mode, encoding=encoding, errors=errors)
    raw = as_path(path).open(mode if "b" in mode else mode + "b")
    return raw if "b" in mode else io.TextIOWrapper(raw, encoding=encoding, errors=errors)


def read_bytes(path: PathLike) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_text(path: PathLike, *, errors: str | None = None) -> str:
    """The file's text as UTF-8 (`errors="replace"` to accept undecodable bytes)."""
    with open(path, "r", errors=errors) as f:
        return f.read()


def write_bytes(path: PathLike, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def write_text(path: PathLike, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def read_range(path: PathLike, start: int, length: int) -> bytes:
    """Bytes [start, start + length) of a file; IndexError if the file is shorter."""
    return read_ranges(path, [start], [length])[0]


def read_ranges(path: PathLike, starts: Sequence[int], lengths: Sequence[int]) -> list[bytes]:
    """Several byte ranges of one file; a remote file is read by concurrent range requests.

    Only the requested bytes cross the network (no read-ahead block cache), so each host of a
    training job reads just the token windows of its own rows.
    """
    starts, lengths = [int(s) for s in starts], [int(n) for n in lengths]
    if any(s < 0 or n < 0 for s, n in zip(starts, lengths)):
        raise IndexError(f"{os.fspath(path)}: negative byte range")
    if is_remote(path):
        path = os.fspath(path)
        ends = [s + n for s, n in zip(starts, lengths)]
        blobs = _fs(path).cat_ranges([path] * len(starts), starts, ends, on_error="raise")
    else:
        blobs = []
        with builtins.open(path, "rb") as f:
            for s, n in zip(starts, lengths):
                f.seek(s)
                blobs.append(f.read(n))
    for s, n, blob in zip(starts, lengths, blobs):
        if len(blob) != n:
            raise IndexError(f"{os.fspath(path)}: bytes [{s}, {s + n}) run past the end of the file "
                             f"(got {len(blob)} of {n})")
    return blobs


@contextlib.contextmanager
def local_copy(path: PathLike) -> Iterator[str]:
    """A local file with the contents of `path`, for libraries that only open real files.

    A local path is yielded as it is; a remote one is downloaded to a temporary directory that
    is removed on exit. Prefer reading the bytes (read_bytes) where the library allows it.
    """
    if not is_remote(path):
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory(prefix="tpustack-") as tmp:
        local = os.path.join(tmp, posixpath.basename(os.fspath(path).rstrip("/")))
        with builtins.open(local, "wb") as f:
            f.write(read_bytes(path))
        yield local


def _fs(path: str):
    """The fsspec filesystem behind a remote path: the very instance etils epath uses.

    Same class and arguments as epath's fsspec backend, so fsspec's instance cache hands back
    the same object and one listings cache sees every write made through either of us.
    """
    import fsspec

    protocol = _SCHEME.match(path).group(1)
    if protocol == "gs":
        return fsspec.filesystem("gcs", finalize_on_close=True)
    return fsspec.filesystem(protocol)
