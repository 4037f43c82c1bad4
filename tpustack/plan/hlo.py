"""Collectives in a compiled (SPMD-partitioned) HLO module: what each moves per step.

Reads `compiled.as_text()`: every all-reduce / all-gather / reduce-scatter /
collective-permute / all-to-all with its operand bytes, its replica-group size, the
computation it sits in and how many times that computation runs per step (a while
loop's `known_trip_count` on CPU/GPU; on TPU, which does not annotate it, the constant
bound of the loop condition; nested loops multiplied). `moved_bytes` is what one device
sends over the links for it with ring algorithms: all-reduce 2 (n-1)/n x bytes,
all-gather and reduce-scatter (n-1)/n x the full (gathered / pre-scatter) bytes,
collective-permute and all-to-all the operand bytes.
"""

from __future__ import annotations

import dataclasses
import math
import re

from tpustack.dtypes import HLO_NAMES, itemsize

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")

_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_OP = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = (.+?) (" + "|".join(KINDS) + r")(?:-start)?\((.*)$")
_ARRAY = re.compile(r"\b(" + "|".join(HLO_NAMES) + r")\[([\d,]*)\]")
_WHILE = re.compile(r"\bwhile\(.*body=%?([\w.\-]+).*?\"known_trip_count\":\{\"n\":\"(\d+)\"")


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str
    computation: str
    operand_bytes: float  # the result's bytes (all-gather: the gathered, full array)
    group: int  # devices in each replica group
    runs: int  # times per step (loop trip counts)
    op_name: str  # jax's metadata: where in the program it came from
    asynchronous: bool = False  # a -start/-done pair: the scheduler may run compute under it

    @property
    def moved_bytes(self) -> float:
        """Bytes one device sends per run (ring algorithms)."""
        n = self.group
        if n <= 1:
            return 0.0
        if self.kind == "all-reduce":
            return 2 * (n - 1) / n * self.operand_bytes
        if self.kind in ("all-gather", "reduce-scatter"):
            return (n - 1) / n * self.operand_bytes
        return self.operand_bytes


def _array_bytes(text: str) -> float:
    return sum(itemsize(d) * math.prod(int(x) for x in dims.split(",") if x) for d, dims in _ARRAY.findall(text))


def _group_size(line: str, kind: str) -> int:
    if kind == "collective-permute":
        return 2
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=mesh\[([^\]]*)\].*?\{([^}]*)\}", line)
    if m:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2)))
    return 1


def computations(hlo_text: str) -> dict[str, list[str]]:
    """The module's computations by name, each as its instruction lines."""
    comps: dict[str, list[str]] = {}
    name = None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            name = header.group(1)
            comps[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None:
            comps[name].append(line)
    return comps


def _trip_count(cond: list[str], body: list[str]) -> int:
    """Trips of a TPU while loop: the bound N of the condition's `i < N` over the step by
    which the body advances i (XLA's windowed einsum loops step by 2)."""
    consts = {m.group(1): int(m.group(2)) for m in (re.match(r"\s*%([\w.\-]+) = [su]32\[\]\S* constant\((\d+)\)", ln)
                                                    for ln in cond) if m}
    bound, index = None, None
    for ln in cond:
        m = re.search(r"compare\(%([\w.\-]+), %([\w.\-]+)\), direction=LT", ln)
        if m and m.group(2) in consts:
            bound = consts[m.group(2)]
            gte = next((g for g in cond if re.match(rf"\s*%{re.escape(m.group(1))} = ", g)), "")
            idx = re.search(r"index=(\d+)", gte)
            index = int(idx.group(1)) if idx else None
    if bound is None:  # no `i < N` found: the largest integer constant, as before
        return max(consts.values(), default=1)
    step = 1
    root = next((ln for ln in body if ln.lstrip().startswith("ROOT ") and " tuple(" in ln), None)
    if root is not None and index is not None:
        operands = re.findall(r"%([\w.\-]+)", root.split(" tuple(", 1)[1])
        if index < len(operands):
            defn = next((ln for ln in body if re.match(rf"\s*%{re.escape(operands[index])} = ", ln)), "")
            add = re.search(r" add\(%([\w.\-]+), %([\w.\-]+)\)", defn)
            if add:
                for name in add.groups():
                    c = next((re.search(r"constant\((\d+)\)", ln) for ln in body
                              if re.match(rf"\s*%{re.escape(name)} = [su]32\[\]\S* constant", ln)), None)
                    if c:
                        step = max(1, int(c.group(1)))
    return max(1, -(-bound // step))


def run_counts(comps: dict[str, list[str]]) -> dict[str, int]:
    """How many times each computation runs per step (while trip counts multiplied down)."""
    # a while body runs trip-count times per run of its caller; other called computations
    # (fusions, reducers, branches) run as often as their caller.
    callers: dict[str, list[tuple[str, int]]] = {}
    for comp, lines in comps.items():
        for line in lines:
            trips_of = {}
            if " while(" in line:
                body = re.search(r"body=%?([\w.\-]+)", line)
                known = _WHILE.search(line)
                cond = re.search(r"condition=%?([\w.\-]+)", line)
                if known:  # XLA CPU / GPU annotate the trip count
                    trips_of[body.group(1)] = int(known.group(2))
                elif body and cond:  # TPU does not: read `i < N` off the condition, i's step off the body
                    trips_of[body.group(1)] = _trip_count(comps.get(cond.group(1), []), comps.get(body.group(1), []))
            for callee in re.findall(r"(?:to_apply|calls|body|condition)=%?([\w.\-]+)", line):
                callers.setdefault(callee, []).append((comp, trips_of.get(callee, 1)))
            for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
                for callee in re.findall(r"%?([\w.\-]+)", group):
                    callers.setdefault(callee, []).append((comp, 1))

    memo: dict[str, int] = {}

    def runs(comp: str, depth: int = 0) -> int:
        if comp in memo:
            return memo[comp]
        if comp not in callers or depth > 50:
            return 1
        memo[comp] = max(runs(c, depth + 1) * t for c, t in callers[comp])
        return memo[comp]

    return {comp: runs(comp) for comp in comps}


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of a compiled module, with how often it runs per step."""
    comps = computations(hlo_text)
    counts = run_counts(comps)

    out = []
    for comp, lines in comps.items():
        for line in lines:
            m = _OP.match(line)
            if not m:
                continue
            result, kind = m.group(1), m.group(2)
            op_name = re.search(r'op_name="([^"]*)"', line)
            # async starts return ((operands), (results)...): count the results only once
            size = _array_bytes(result)
            if line.split("=", 1)[1].strip().startswith("(") and f"{kind}-start(" in line:
                size /= 2
            out.append(Collective(kind, comp, size, _group_size(line, kind), counts[comp],
                                  op_name.group(1) if op_name else "", f"{kind}-start(" in line))
    return out


def summary(colls: list[Collective]) -> dict[str, dict[str, float]]:
    """Per kind: ops (static), runs per step, and bytes moved per device per step."""
    out: dict[str, dict[str, float]] = {}
    for c in colls:
        row = out.setdefault(c.kind, {"ops": 0, "runs": 0, "moved_bytes": 0.0})
        row["ops"] += 1
        row["runs"] += c.runs
        row["moved_bytes"] += c.runs * c.moved_bytes
    return out
