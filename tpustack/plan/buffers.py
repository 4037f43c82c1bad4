"""Buffers as XLA allocates them per device: the parameter tree (names, shapes and logical axes
from the model), its shard shapes under the mesh's rules, and each buffer's bytes (TPU tiles).

The tree is written once, in tpustack.model: `param_table` reads it off
`tpustack.model.abstract_params`, eval_shape of the decoder's init (abstract: nothing is
allocated; a 70B-class config takes seconds unrolled, as init traces every layer, and a
tenth of one scanned), and caches it per config. The lowest module of the estimate:
memory and activations build on it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any, Sequence

import jax
from flax import linen as nn

from tpustack.config import ModelConfig
from tpustack.mesh import RULES
from tpustack.model import abstract_params

MESH_AXES = ("data", "stage", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class Param:
    name: str  # the path in the params tree, e.g. "layers/block/attn/q", "layer_0/mlp/up"
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical names, as tpustack/model annotates them


def param_table(cfg: ModelConfig) -> tuple[Param, ...]:
    """Every parameter of tpustack.model.Decoder(cfg) with its shape and logical axes.

    The float tree whatever model.weight_quant says (the estimate counts quantized formats
    itself); the attention implementation and remat policy change no parameter."""
    return _param_table(dataclasses.replace(cfg, weight_quant="none", attention_impl="xla", remat_policy="none"))


@functools.lru_cache(maxsize=64)
def _param_table(cfg: ModelConfig) -> tuple[Param, ...]:
    leaves = jax.tree_util.tree_leaves_with_path(abstract_params(cfg), is_leaf=lambda x: isinstance(x, nn.Partitioned))
    table = []
    for path, leaf in leaves:
        boxed_leaf = isinstance(leaf, nn.Partitioned)
        shape = tuple((leaf.value if boxed_leaf else leaf).shape)
        axes = tuple(leaf.names) if boxed_leaf else (None,) * len(shape)
        table.append(Param("/".join(str(k.key) for k in path), shape, axes))
    return tuple(table)


def default_rules() -> dict[str, Any]:
    """The logical -> mesh axis table of tpustack.mesh (the one table), as a dict."""
    return dict(RULES["default"])


def shard_shape(shape: Sequence[int], axes: Sequence[str | None], mesh: dict[str, int], rules: dict[str, Any],
                sharded_axes: Sequence[str] = MESH_AXES) -> tuple[int, ...]:
    """Per-device shape: each dim divided by the mesh axes its logical name maps to (ceil)."""
    out = []
    for dim, name in zip(shape, axes):
        target = rules.get(name)
        names = target if isinstance(target, tuple) else ((target,) if target else ())
        ways = math.prod(mesh.get(a, 1) for a in names if a in sharded_axes)
        out.append(-(-dim // ways))
    return tuple(out)


def buffer_bytes(shape: Sequence[int], bytes_per_elem: float, backend: str = "cpu") -> float:
    """Bytes XLA allocates for one array of `shape` on `backend`.

    CPU: dense. TPU: every array is laid out in tiles over its two minor-most dimensions,
    (8, 128) 32-bit words: the minor dim pads to a multiple of 128, the second-minor to a
    multiple of 8 rows (16 for 2-byte types, two packed per word; a dim under that takes
    the smallest power-of-two tile that holds it, T(1|2|4, 128)). XLA TPU's layout
    assignment picks which two dims are minor; read off the compiled HLO it picks the pair
    that pads least (e.g. f32[384,24]{0,1:T(8,128)}, f32[3,24,6,32]{3,1,2,0:T(8,128)}),
    so that is what is counted. A 1-D array pads to a multiple of 128 (scalars are noise).
    """
    return _buffer_bytes(tuple(int(s) for s in shape), bytes_per_elem, backend)


@functools.lru_cache(maxsize=65536)  # --suggest asks for the same shards thousands of times
def _buffer_bytes(shape: tuple[int, ...], bytes_per_elem: float, backend: str) -> float:
    if backend != "tpu" or not shape:
        return math.prod(shape) * bytes_per_elem
    if len(shape) == 1:
        return -(-shape[0] // 128) * 128 * bytes_per_elem
    rows = max(1, int(8 * 4 // bytes_per_elem)) if bytes_per_elem >= 1 else 32

    def padded(i: int, j: int) -> int:
        minor = -(-shape[i] // 128) * 128
        s = shape[j]
        second = (1 << (s - 1).bit_length()) if s < rows else -(-s // rows) * rows
        return minor * second * math.prod(shape[k] for k in range(len(shape)) if k not in (i, j))

    return min(padded(i, j) for i, j in itertools.permutations(range(len(shape)), 2)) * bytes_per_elem


def tree_bytes(table: Sequence[Param], bytes_per_elem: float, mesh: dict[str, int] | None = None,
               zero_sharded: bool = True, rules: dict[str, Any] | None = None, backend: str = "cpu") -> float:
    """Per-device bytes of a parameter-shaped tree; zero_sharded=False replicates it over fsdp.

    backend "tpu" counts each array with its (8, 128) tile padding (see buffer_bytes)."""
    mesh = mesh or {}
    rules = default_rules() if rules is None and mesh else (rules or {})
    axes = MESH_AXES if zero_sharded else ("data", "stage", "tensor")
    return sum(buffer_bytes(shard_shape(p.shape, p.axes, mesh, rules, axes), bytes_per_elem, backend)
               for p in table)


def layer_params(cfg: ModelConfig) -> tuple[Param, ...]:
    """One decoder layer's parameters (as an unrolled layer holds them, named layer_0/...)."""
    return tuple(p for p in param_table(_one_layer(cfg)) if p.name.startswith("layer_0/"))


def end_params(cfg: ModelConfig) -> tuple[Param, ...]:
    """The parameters outside the layers: embedding, final norm, LM head."""
    return tuple(p for p in param_table(_one_layer(cfg)) if not p.name.startswith("layer_0/"))


def stacked_params(table: Sequence[Param]) -> list[Param]:
    """The scanned layers' [L, ...] parameters of a table."""
    return [p for p in table if p.axes and p.axes[0] == "layers"]


def _one_layer(cfg: ModelConfig) -> ModelConfig:
    return dataclasses.replace(cfg, num_layers=1, scan_layers=False)
