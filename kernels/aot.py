"""Ahead-of-time TPU compiles on a machine without TPUs (libtpu + virtual topologies).

`compile_on(topology, fn, *args)` wraps fn in shard_map over a 1-D mesh of the
topology's virtual chips (Mosaic kernels must sit inside shard_map), splits the
leading axis of every argument across the chips, lowers, and runs the real TPU
compiler. Used by the tests and by anyone checking a kernel for a TPU generation.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from . import compat
from .decode_attention import decode_attention, paged_attention
from .flash_attention import flash_attention
from .quant_matmul import int4_matmul, int8_matmul, w8a8_matmul

TOPOLOGIES = {"v5e": "v5e:2x2", "v6e": "v6e:2x2", "v4": "v4:2x2x1", "v5p": "v5p:2x2x1"}


@functools.lru_cache(maxsize=None)
def topology(name: str) -> Any:
    """Virtual devices of a TPU topology, e.g. 'v5e:2x2'; raises if libtpu is missing."""
    return topologies.get_topology_desc(platform="tpu", topology_name=name)


def shard_map_fn():
    """jax.shard_map (new) or jax.experimental.shard_map.shard_map (old)."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map
    from jax.experimental.shard_map import shard_map  # pragma: no cover - jax < 0.7 only: the compat fallback
    return shard_map


def compile_on(topology_name: str, fn: Callable[..., Any], *args: jax.ShapeDtypeStruct) -> Any:
    """Compiled executable of fn for the topology; args are per-chip structs, stacked on axis 0."""
    devs = np.array(topology(topology_name).devices)
    args = tuple(jax.ShapeDtypeStruct((a.shape[0] * devs.size, *a.shape[1:]), a.dtype) for a in args)
    mesh = Mesh(devs.reshape(-1), ("x",))
    spec = P("x")
    sm = shard_map_fn()(fn, mesh=mesh, in_specs=tuple(spec for _ in args), out_specs=spec,
                        check_vma=False)
    shard = NamedSharding(mesh, spec)
    structs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shard) for a in args]
    return jax.jit(sm).lower(*structs).compile()


def vmem_report(compiled: Any) -> dict[str, int]:
    """What the compiler reports: memory_analysis() bytes plus any VMEM figure in the HLO text."""
    out: dict[str, int] = {}
    ma = compiled.memory_analysis()
    if ma is not None:
        for f in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
                  "generated_code_size_in_bytes"):
            if hasattr(ma, f):
                out[f] = int(getattr(ma, f))
    try:
        text = compiled.as_text()
    except Exception:  # noqa: BLE001 - not every backend gives text
        text = ""
    sizes = [int(m) for m in re.findall(r"scoped_memory[^0-9]{0,40}?(\d+)", text)]
    if sizes:
        out["scoped_vmem_bytes"] = max(sizes)
    return out


# ---- one case per TPU kernel: (build fn, argument structs) at a small realistic shape ----

def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def cases(dtype) -> dict[str, tuple[Callable[..., Any], list[jax.ShapeDtypeStruct]]]:
    """Kernel name -> (fn, per-chip argument structs)."""

    kw = dict(impl="pallas", platform="tpu", interpret=False)
    B, T, N, K, H = 1, 512, 8, 2, 128
    q, kv = _sds((B, T, N, H), dtype), _sds((B, T, K, H), dtype)
    seg = _sds((B, T), jnp.int32)

    def fwd_bwd(q, k, v, s):
        def loss(q, k, v):
            o = flash_attention(q, k, v, s, causal=True, soft_cap=30.0, **kw)
            return o.astype(jnp.float32).sum()
        return sum(g.astype(jnp.float32).sum(axis=(1, 2, 3)) for g in jax.grad(loss, (0, 1, 2))(q, k, v))

    S, P, L, M = 1024, 64, 64, 4  # cache length; pages per chip, page size, pages per sequence
    qd = _sds((B, N, H), dtype)
    cache, scale = _sds((B, S, K, H), dtype), _sds((B, S, K), jnp.float32)
    cache8 = _sds((B, S, K, H), jnp.int8)
    lens = _sds((B,), jnp.int32)
    pages, pages8, pscale = _sds((P, L, K, H), dtype), _sds((P, L, K, H), jnp.int8), _sds((P, L, K), jnp.float32)
    table = _sds((B, M), jnp.int32)
    Mx, Kx, Nx = 16, 1024, 512
    x, w8, s8 = _sds((Mx, Kx), dtype), _sds((Kx, Nx), jnp.int8), _sds((Nx,), jnp.float32)
    w4, s4 = _sds((Kx // 2, Nx), jnp.int8), _sds((Kx // 128, Nx), jnp.float32)
    return {
        "flash_attention_fwd": (lambda q, k, v, s: flash_attention(q, k, v, s, causal=True, **kw), [q, kv, kv, seg]),
        "flash_attention_fwd_bwd": (fwd_bwd, [q, kv, kv, seg]),
        "decode_attention": (lambda q, k, v, n: decode_attention(q, k, v, n, **kw), [qd, cache, cache, lens]),
        "decode_attention_int8kv": (lambda q, k, v, n, a, b: decode_attention(q, k, v, n, k_scale_BSK=a, v_scale_BSK=b, **kw),
                                    [qd, cache8, cache8, lens, scale, scale]),
        "paged_attention": (lambda q, k, v, t, n: paged_attention(q, k, v, t % P, n, **kw), [qd, pages, pages, table, lens]),
        "paged_attention_int8kv": (lambda q, k, v, t, n, a, b: paged_attention(q, k, v, t % P, n, k_scale_PLK=a, v_scale_PLK=b, **kw),
                                   [qd, pages8, pages8, table, lens, pscale, pscale]),
        "int8_matmul": (lambda x, w, s: int8_matmul(x, w, s, **kw), [x, w8, s8]),
        "int4_matmul": (lambda x, w, s: int4_matmul(x, w, s, **kw), [x, w4, s4]),
        "w8a8_matmul": (lambda x, w, s: w8a8_matmul(x, w, s, **kw), [x, w8, s8]),
    }


def compile_case(generation: str, kernel: str, dtype) -> dict[str, Any]:
    """Compile one case for one generation; returns HBM figures and the VMEM estimate."""
    compat.VMEM_ESTIMATE.clear()
    fn, args = cases(dtype)[kernel]
    compiled = compile_on(TOPOLOGIES[generation], fn, *args)
    text = compiled.as_text()
    if "tpu_custom_call" not in text:
        raise AssertionError(f"{kernel}: no Mosaic custom call in the compiled program")
    rep = vmem_report(compiled)
    rep.pop("scoped_vmem_bytes", None)
    rep["vmem_estimate_bytes"] = max(compat.VMEM_ESTIMATE.values(), default=0)
    return rep


def main() -> None:  # pragma: no cover - a report script
    """Print the kernels x generations table (python -m tpustack.kernels.aot)."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    rows = []
    for kernel in cases(jnp.float32):
        for dt in (jnp.bfloat16, jnp.float32):
            for gen in TOPOLOGIES:
                try:
                    rep = compile_case(gen, kernel, dt)
                    rows.append(dict(kernel=kernel, dtype=jnp.dtype(dt).name, gen=gen, ok=True, **rep))
                except Exception as e:  # noqa: BLE001 - the table records the failure
                    rows.append(dict(kernel=kernel, dtype=jnp.dtype(dt).name, gen=gen, ok=False,
                                     error=str(e).splitlines()[0][:200]))
                r = rows[-1]
                print(f"{r['kernel']:26s} {r['dtype']:8s} {r['gen']:4s} "
                      f"{'ok' if r['ok'] else 'FAIL'} vmem~{r.get('vmem_estimate_bytes', 0) / 2**10:.0f}KiB "
                      f"{r.get('error', '')}", flush=True)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":  # pragma: no cover
    main()
