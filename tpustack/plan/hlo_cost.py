"""FLOPs and HBM bytes of every executed op of a compiled HLO module, times its runs per step.

`compiled.cost_analysis()` on TPU counts a while loop's body once, so for a scanned model
its totals hide all layers but one. This reads the module instead: every instruction of the
computations that execute (the entry, while bodies and conditions, conditional branches,
calls), with how often it runs (tpustack.plan.hlo.run_counts: trip counts multiplied down).
Per op:

- FLOPs: dots 2 x result x contracted size; convolutions (XLA TPU writes batched matmuls
  as convolutions whose batch dims are padded windows) 2 x batch x out-features x
  in-features x the (output, window) pairs that fall inside the input per spatial dim,
  as XLA's HloCostAnalysis counts them; one FLOP per result element of arithmetic ops.
  A fusion's FLOPs are those of the ops inside it.
- custom calls (Pallas kernels) carry no FLOPs in the HLO (ours declare no cost
  estimate): 0 here, their bytes as any op's; steptime adds the kernels' FLOPs by formula.
  A kernel compiled in interpret mode (what `tpustack.kernels` does on a CPU host, the
  virtual-TPU compile included) is XLA loops over its grid: those ops are marked
  "interpreted-kernel" with no cost, and steptime prices the kernel by formula.
- bytes: what the op reads and writes in HBM: its operands and result, except that a fused
  dynamic-slice reads only the slice (a scan step's layer out of the stacked [L, ...]
  weights) and a fused dynamic-update-slice writes only the update in place.

`count_once=True` ignores the run counts: the totals then compare with cost_analysis().
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from tpustack.plan.hlo import KINDS, _array_bytes, computations, run_counts

_LINE = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_ARR = re.compile(r"\b(?:f32|bf16|f16|s32|u32|pred|s8|u8|f64|s64)\[([\d,]*)\]")
# ops of a tpustack.kernels Pallas kernel lowered in interpret mode (flash_fwd_tpu, ...): on
# a CPU host the kernels interpret unless told otherwise, so a virtual-TPU compile holds the
# kernel as XLA loops over its grid, not the Mosaic call a TPU runs
_INTERPRETED = re.compile(r'op_name="(?:[^"]*/)?\w+_tpu/')
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
         "after-all", "partition-id", "replica-id", "opt-barrier", "copy-start", "copy-done", "iota",
         "add-dependency"}
_ARITH = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "exponential", "log", "tanh", "rsqrt",
          "sqrt", "power", "negate", "abs", "compare", "select", "logistic", "exponential-minus-one", "reduce"}


@dataclasses.dataclass(frozen=True)
class HloOp:
    name: str
    computation: str
    opcode: str
    flops: float  # per run
    bytes: float  # HBM bytes read + written per run
    runs: int


@dataclasses.dataclass(frozen=True)
class _Inst:
    name: str
    result: str  # the result type text
    opcode: str
    args: str  # everything after "opcode("

    def operands(self) -> list[str]:
        head = self.args.split("),", 1)[0] if ")," in self.args else self.args.rsplit(")", 1)[0]
        return re.findall(r"%([\w.\-]+)", head)


def _dims(text: str) -> list[list[int]]:
    return [[int(x) for x in d.split(",") if x] for d in _ARR.findall(text)]


def _parse(comps: dict[str, list[str]]) -> dict[str, list[_Inst]]:
    out = {}
    for comp, lines in comps.items():
        out[comp] = []
        for line in lines:
            m = _LINE.match(line)
            if m:
                out[comp].append(_Inst(m.group(1), m.group(2), m.group(3), m.group(4)))
    return out


def _conv_flops(inst: _Inst, shapes: dict[str, list[int]]) -> float:
    """Exact multiply-adds x 2 of a convolution (padding and dilation counted as HloCostAnalysis does)."""
    ops = inst.operands()
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", inst.args)
    if len(ops) < 2 or not labels or ops[0] not in shapes or ops[1] not in shapes:
        return 0.0
    lhs, rhs, out = shapes[ops[0]], shapes[ops[1]], _dims(inst.result)[0]
    ll, rl, ol = labels.groups()
    window = re.search(r"window=\{([^}]*)\}", inst.args)
    fields = dict(re.findall(r"(\w+)=([\w_x\-]+)", window.group(1))) if window else {}
    n_sp = sum(c.isdigit() for c in ll)

    def field(key: str, default: int) -> list[int]:
        if key not in fields:
            return [default] * n_sp
        return [int(x) for x in fields[key].split("x")]

    stride, ldil, rdil = field("stride", 1), field("lhs_dilate", 1), field("rhs_dilate", 1)
    pads = [tuple(int(v) for v in p.split("_")) for p in fields["pad"].split("x")] if "pad" in fields else [(0, 0)] * n_sp
    valid = 1.0
    for d in range(n_sp):
        c = str(d)
        n_in, k, n_out = lhs[ll.index(c)], rhs[rl.index(c)], out[ol.index(c)]
        pos = np.arange(n_out)[:, None] * stride[d] + np.arange(k)[None, :] * rdil[d] - pads[d][0]
        ok = (pos >= 0) & (pos <= (n_in - 1) * ldil[d]) & (pos % ldil[d] == 0)
        valid *= float(ok.sum())
    return 2.0 * out[ol.index("b")] * out[ol.index("f")] * rhs[rl.index("i")] * valid


def _flops(inst: _Inst, shapes: dict[str, list[int]]) -> float:
    if inst.opcode == "convolution":
        return _conv_flops(inst, shapes)
    res = _dims(inst.result)
    elems = sum(math.prod(d) for d in res)
    if inst.opcode == "dot":
        ops = inst.operands()
        contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst.args)
        if not ops or ops[0] not in shapes or not contract:
            return 0.0
        lhs = shapes[ops[0]]
        return 2.0 * elems * math.prod(lhs[int(i)] for i in contract.group(1).split(",") if i)
    if inst.opcode == "reduce":
        ops = inst.operands()
        return float(math.prod(shapes[ops[0]])) if ops and ops[0] in shapes else float(elems)
    return float(elems) if inst.opcode in _ARITH else 0.0


def _fusion_bytes(inst: _Inst, body: list[_Inst], nbytes: dict[str, float]) -> float:
    """HBM bytes of a fusion: each operand as its fused parameter is read, plus the result."""
    params = {}
    for i in body:
        if i.opcode == "parameter":
            params[int(re.match(r"(\d+)", i.args).group(1))] = i.name
    users: dict[str, list[_Inst]] = {}
    for i in body:
        for o in i.operands():
            users.setdefault(o, []).append(i)
    root = body[-1] if body else None
    total = 0.0
    for k, operand in enumerate(inst.operands()):
        p = params.get(k)
        use = users.get(p, []) if p else []
        if use and all(u.opcode == "dynamic-slice" and u.operands()[0] == p for u in use):
            total += sum(_array_bytes(u.result) for u in use)
        elif use and all(u.opcode == "dynamic-update-slice" and u.operands()[0] == p for u in use):
            continue  # updated in place: the update's bytes are the write below
        else:
            total += nbytes.get(operand, 0.0)
    dus = [i for i in body if i.opcode == "dynamic-update-slice"]
    if root is not None and dus and root.opcode in ("dynamic-update-slice", "tuple", "bitcast"):
        by_name = {i.name: i for i in body}
        total += sum(_array_bytes(by_name[u.operands()[1]].result) if u.operands()[1] in by_name else 0.0
                     for u in dus)
    else:
        total += _array_bytes(inst.result)
    return total


def hlo_ops(hlo_text: str, count_once: bool = False) -> list[HloOp]:
    """Every executed op of a compiled module with its FLOPs, HBM bytes and runs per step."""
    comps = computations(hlo_text)
    insts = _parse(comps)
    counts = run_counts(comps)
    shapes: dict[str, list[int]] = {}
    nbytes: dict[str, float] = {}
    for body in insts.values():
        for i in body:
            d = _dims(i.result)
            if d:
                shapes[i.name] = d[0]
            nbytes[i.name] = _array_bytes(i.result)
    executed = _executed(insts)
    interpreted = _interpreted(insts, executed)
    out = []
    for comp in executed:
        for i in insts.get(comp, []):
            if comp in interpreted or _INTERPRETED.search(i.args):  # priced by the kernel's formula (steptime)
                out.append(HloOp(i.name, comp, "interpreted-kernel", 0.0, 0.0, 1 if count_once else counts[comp]))
                continue
            if i.opcode in _FREE or i.opcode.endswith("-done") or any(i.opcode.startswith(k) for k in KINDS):
                continue
            if i.opcode == "custom-call" and 'custom_call_target="tpu_custom_call"' not in i.args:
                continue  # sharding / layout annotations, not work
            if i.opcode == "fusion":
                called = re.search(r"calls=%?([\w.\-]+)", i.args)
                body = insts.get(called.group(1), []) if called else []
                flops = sum(_flops(j, shapes) for j in body)
                nb = _fusion_bytes(i, body, nbytes)
            elif i.opcode == "dynamic-update-slice":  # in place: the update is read and written
                flops, ops_ = 0.0, i.operands()
                nb = 2 * nbytes.get(ops_[1], 0.0) if len(ops_) > 1 else 0.0
            elif i.opcode == "dynamic-slice":  # reads the slice only
                flops, nb = 0.0, 2 * _array_bytes(i.result)
            else:
                flops = _flops(i, shapes)
                nb = sum(nbytes.get(o, 0.0) for o in i.operands()) + _array_bytes(i.result)
            out.append(HloOp(i.name, comp, i.opcode, flops, nb, 1 if count_once else counts[comp]))
    return out


def _interpreted(insts: dict[str, list[_Inst]], executed: list[str]) -> set[str]:
    """Computations that run only inside an interpret-mode kernel (its grid loop and branches)."""
    out: set[str] = set()
    for comp in executed:  # callers come before their callees in `executed`
        for i in insts.get(comp, []):
            if i.opcode in ("while", "conditional", "call") and (comp in out or _INTERPRETED.search(i.args)):
                out.update(re.findall(r"(?:body|condition|to_apply)=%?([\w.\-]+)", i.args))
                for group in re.findall(r"branch_computations=\{([^}]*)\}", i.args):
                    out.update(re.findall(r"%?([\w.\-]+)", group))
    return out


def _executed(insts: dict[str, list[_Inst]]) -> list[str]:
    """Computations that run as a sequence of ops (not fused bodies or reducers)."""
    entry = next((c for c in insts if c.startswith("main") or "ENTRY" in c), None)
    todo = [entry] if entry else list(insts)[-1:]
    seen: list[str] = []
    while todo:
        comp = todo.pop()
        if comp in seen or comp not in insts:
            continue
        seen.append(comp)
        for i in insts[comp]:
            if i.opcode == "while":
                todo += re.findall(r"(?:body|condition)=%?([\w.\-]+)", i.args)
            elif i.opcode == "conditional":
                for group in re.findall(r"branch_computations=\{([^}]*)\}", i.args):
                    todo += re.findall(r"%?([\w.\-]+)", group)
            elif i.opcode == "call":
                todo += re.findall(r"to_apply=%?([\w.\-]+)", i.args)
    return seen
