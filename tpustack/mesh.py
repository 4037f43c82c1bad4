"""Device mesh from config, and the ONE table mapping logical axis names to mesh axes.

Parameters are annotated where they are created with logical names (`embed`, `mlp`,
`heads`, `kv_heads`, `head_dim`, `vocab`, `layers`, `norm`); activations with `batch`,
`length`, `act_*`. This table turns them into mesh axes. FSDP shards every weight's
`embed` dimension over `fsdp`; tensor parallelism shards heads / mlp / vocab over
`tensor` (Megatron: column-parallel in, row-parallel out); `data` replicates weights.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tpustack.config import MeshConfig
from tpustack.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

LogicalRules = tuple[tuple[str, Any], ...]

RULES: dict[str, LogicalRules] = {
    "default": (
        # parameters
        ("embed", "fsdp"),
        ("vocab", "tensor"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("layers", None),
        ("norm", None),
        # activations
        ("batch", ("data", "fsdp")),
        ("length", None),
        ("act_embed", None),
        ("act_heads", "tensor"),
        ("act_kv_heads", "tensor"),
        ("act_mlp", "tensor"),
        ("act_vocab", "tensor"),
    ),
}


def rules_for(name: str) -> LogicalRules:
    if name not in RULES:
        raise UserError(f"config.mesh.rules: unknown table {name!r}; known: {', '.join(RULES)}")
    return RULES[name]


def mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Resolve -1 (fill the rest) and check the product against the device count."""
    sizes = {axis: int(getattr(cfg, axis)) for axis in MESH_AXES}
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise UserError(f"config.mesh: only one axis may be -1, got {', '.join(fill)}")
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise UserError(f"config.mesh.{axis}={size}: sizes are positive, or -1 to fill the rest")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if num_devices % known:
            raise UserError(
                f"config.mesh: the fixed axes multiply to {known}, which does not divide "
                f"the {num_devices} devices; change the mesh sizes")
        sizes[fill[0]] = num_devices // known
    product = math.prod(sizes.values())
    if product != num_devices:
        shape = " x ".join(f"{a}={s}" for a, s in sizes.items())
        raise UserError(f"config.mesh: {shape} = {product} devices, but {num_devices} are available; "
                        f"make the product {num_devices} (or set one axis to -1)")
    return sizes


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh over all (or the given) devices with axes (data, fsdp, tensor)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_shape(cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        device_array = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # noqa: BLE001 - virtual / CPU devices have no physical topology
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: LogicalRules):
    """Trace under `mesh` and the logical rules, so with_logical_constraint can resolve names."""
    set_mesh = getattr(jax, "set_mesh", None)  # jax >= 0.7; `with mesh:` is deprecated there
    with (set_mesh(mesh) if set_mesh else mesh), nn.logical_axis_rules(rules):
        yield


def check_divisible(abstract: Any, specs: Any, mesh: Mesh) -> None:
    """Every sharded dimension must divide by the product of its mesh axes."""
    flat_abs = jax.tree_util.tree_leaves_with_path(abstract)
    flat_specs = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    for (path, leaf), spec in zip(flat_abs, flat_specs):
        if not isinstance(spec, PartitionSpec):
            continue
        for dim, axes in zip(leaf.shape, spec):
            if axes is None:
                continue
            axes = axes if isinstance(axes, tuple) else (axes,)
            size = math.prod(mesh.shape[a] for a in axes)
            if dim % size:
                name = jax.tree_util.keystr(path)
                raise UserError(
                    f"config.mesh: {name} has a dimension of {dim}, not divisible by "
                    f"{'x'.join(axes)}={size}; change the mesh or the model size")


def batch_sharding(mesh: Mesh, rules: LogicalRules, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, length, ...] input: batch over data x fsdp."""
    spec = nn.logical_to_mesh_axes(("batch",) + ("length",) + (None,) * (ndim - 2), rules)
    return NamedSharding(mesh, spec)


def batch_divisor(mesh: Mesh, rules: LogicalRules) -> int:
    """How many ways the batch dimension is split."""
    spec = nn.logical_to_mesh_axes(("batch",), rules)[0]
    axes = spec if isinstance(spec, tuple) else ((spec,) if spec else ())
    return math.prod(mesh.shape[a] for a in axes)


def param_shardings(model_cfg, mesh: Mesh, rules: LogicalRules) -> Any:
    """NamedShardings of a Decoder's (unboxed) params, from the logical names they carry."""
    import jax.numpy as jnp

    from tpustack.model import Decoder

    boxed = jax.eval_shape(lambda: Decoder(model_cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)["params"]


def kv_cache_sharding(mesh: Mesh, rules: LogicalRules, ndim: int) -> NamedSharding:
    """[B, S, K(, H)] cache arrays: batch like activations, kv heads over tensor."""
    names = ("batch", "length", "act_kv_heads", None)[:ndim]
    return NamedSharding(mesh, nn.logical_to_mesh_axes(names, rules))
