"""What XLA TPU's memory_analysis reports, read off a compile's dump (docs/capacity.md).

    XLA_FLAGS=--xla_dump_to=DIR python benchmarks/estimate_vs_xla.py --one '<sample JSON>'
    python benchmarks/xla_heap.py DIR [--temp BYTES] [--at STEP]

Prints the train step's HBM heap (the default-memory `preallocated-temp` allocation of the
buffer assignment) and L, the peak over the live-range file's time steps of the heap chunks
held by values that are not while-loop phis; memory_analysis's temp is 2 x heap - L (given
--temp, the memory_analysis figure, it prints the difference). --at STEP lists what is
listed (non-phi) at that step, largest first; without it, the profile over the program.
"""

from __future__ import annotations

import argparse
import collections
import glob
import re


def _read(dump: str, suffix: str) -> str:
    paths = glob.glob(f"{dump}/*jit_train_step*after_optimizations{suffix}")
    if not paths:
        raise SystemExit(f"no *jit_train_step*after_optimizations{suffix} under {dump}")
    with open(paths[0]) as f:
        return f.read()


def heap_values(dump: str) -> tuple[int, list[tuple[str, bool, int, int, str]]]:
    """(heap bytes, [(value, is_phi, size, offset, shape)]) of the largest default-memory temp allocation."""
    allocs, cur = [], None
    for line in _read(dump, "-buffer-assignment.txt").splitlines():
        m = re.match(r"allocation \d+: size (\d+), (.*)", line)
        if m:
            cur = (int(m.group(1)), m.group(2), [])
            allocs.append(cur)
            continue
        m = re.match(r"\s*value: <\d+ (\S+)( \(phi\))? @\d+> \(size=(\d+),offset=(\d+)\): (\S+)", line)
        if m and cur is not None:
            cur[2].append((m.group(1), bool(m.group(2)), int(m.group(3)), int(m.group(4)), m.group(5)))
    size, _, values = max((a for a in allocs if a[1].startswith("preallocated-temp")), key=lambda a: a[0])
    return size, values


def listed_profile(dump: str):
    """Bytes of heap chunks held by non-phi values at each step, and which value holds each chunk."""
    size, values = heap_values(dump)
    text = _read(dump, "-live-range.txt")
    ranges = {m.group(1): (int(m.group(2)), int(m.group(3))) for m in re.finditer(
        r"^    (\S+?):(\d+)-(\d+)$", text.split("BufferLiveRange:")[1].split("Live ranges at")[0], re.M)}
    steps = int(re.search(r"max (\d+)", text).group(1))
    chunks = collections.defaultdict(list)
    for name, phi, nbytes, offset, shape in values:
        r = ranges.get(name if "{" in name else name + "{}") or ranges.get(name)
        if not phi and r:
            chunks[(offset, nbytes)].append((r, name, shape))
    occupied = [0] * (steps + 2)
    for (_, nbytes), held in chunks.items():
        for t in set().union(*(range(s, e + 1) for (s, e), _, _ in held)):
            occupied[t] += nbytes
    return size, occupied, chunks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dump")
    ap.add_argument("--temp", type=float, default=None, help="memory_analysis's temp bytes, to compare")
    ap.add_argument("--at", type=int, default=None, help="list the non-phi values at this step")
    args = ap.parse_args()
    heap, occupied, chunks = listed_profile(args.dump)
    peak = max(occupied)
    print(f"heap {heap / 1e6:.1f} MB, L (non-phi peak) {peak / 1e6:.1f} MB at step {occupied.index(peak)}, "
          f"2 x heap - L = {(2 * heap - peak) / 1e6:.1f} MB"
          + (f" (memory_analysis temp {args.temp / 1e6:.1f} MB)" if args.temp else ""))
    if args.at is None:
        step = max(1, len(occupied) // 30)
        for t0 in range(0, len(occupied), step):
            t = max(range(t0, min(len(occupied), t0 + step)), key=occupied.__getitem__)
            print(f"  step {t:6d} listed {occupied[t] / 1e6:10.1f} MB")
        return
    rows = []
    for (_, nbytes), held in chunks.items():
        live = [(name, shape) for (s, e), name, shape in held if s <= args.at <= e]
        if live:
            rows.append((nbytes, *live[0]))
    rows.sort(reverse=True)
    for nbytes, name, shape in rows[:40]:
        print(f"  {nbytes / 1e6:10.1f} MB {name:36s} {shape[:70]}")


if __name__ == "__main__":
    main()
