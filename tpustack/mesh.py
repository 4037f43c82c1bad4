"""Device mesh from config, and the ONE table mapping logical axis names to mesh axes.

Parameters are annotated where they are created with logical names (`embed`, `mlp`,
`heads`, `kv_heads`, `head_dim`, `vocab`, `layers`, `norm`); activations with `batch`,
`length`, `act_*`. This table turns them into mesh axes. FSDP shards every weight's
`embed` dimension over `fsdp`; tensor parallelism shards heads / mlp / vocab over
`tensor` (Megatron: column-parallel q/k/v and gate/up, row-parallel o and down, a
vocabulary-parallel embedding and LM head); pipeline parallelism splits the stacked
`layers` over `stage`; `data` replicates weights. How much of the train state `fsdp`
shards is the ZeRO stage (`parallel.zero_stage`, see `zero_shardings`).

Axis order (data, stage, fsdp, tensor): the outermost axes are the ones whose
collectives are rarest, so multislice puts them across slices (DCN) and keeps `tensor`,
which talks every layer, on the fastest links.
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

from tpustack.config import MeshConfig, ModelConfig
from tpustack.errors import UserError
from tpustack.model import abstract_params

MESH_AXES = ("data", "stage", "fsdp", "tensor")

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
        ("layers", "stage"),
        ("norm", None),
        # activations
        ("batch", ("data", "fsdp")),
        ("length", None),
        ("act_embed", None),
        ("act_heads", "tensor"),
        ("act_kv_heads", "tensor"),
        ("act_mlp", "tensor"),
        ("act_vocab", "tensor"),
        ("act_stage", "stage"),
    ),
}
# Sequence-sharded activations between layers: for long contexts where [B, T, D] per device
# is what does not fit. Weights as in the default table.
RULES["sequence"] = tuple(("length", "tensor") if name == "length" else (name, axes)
                          for name, axes in RULES["default"])


def rules_for(name: str) -> LogicalRules:
    if name not in RULES:
        raise UserError(f"config.mesh.rules: unknown table {name!r}; known: {', '.join(RULES)}")
    return RULES[name]


def mesh_layout(cfg: MeshConfig, num_devices: int) -> tuple[dict[str, int], dict[str, int]]:
    """(ICI sizes, DCN sizes) per axis: resolve -1 (fill the slice) and check the products."""
    dcn = {axis: int(getattr(cfg, f"dcn_{axis}")) for axis in MESH_AXES}
    for axis, size in dcn.items():
        if size < 1:
            raise UserError(f"config.mesh.dcn_{axis}={size}: DCN sizes are >= 1 (1: within one slice)")
    slices = math.prod(dcn.values())
    if num_devices % slices:
        raise UserError(f"config.mesh: the dcn_* sizes multiply to {slices} slices, which does not divide "
                        f"the {num_devices} devices; change the dcn_* sizes")
    per_slice = num_devices // slices
    ici = {axis: int(getattr(cfg, axis)) for axis in MESH_AXES}
    fill = [a for a, s in ici.items() if s == -1]
    if len(fill) > 1:
        raise UserError(f"config.mesh: only one axis may be -1, got {', '.join(fill)}")
    for axis, size in ici.items():
        if size == 0 or size < -1:
            raise UserError(f"config.mesh.{axis}={size}: sizes are positive, or -1 to fill the rest")
    known = math.prod(s for s in ici.values() if s != -1)
    where = f" per slice ({slices} slices)" if slices > 1 else ""
    if fill:
        if per_slice % known:
            raise UserError(
                f"config.mesh: the fixed axes multiply to {known}, which does not divide "
                f"the {per_slice} devices{where}; change the mesh sizes")
        ici[fill[0]] = per_slice // known
    product = math.prod(ici.values())
    if product != per_slice:
        shape = " x ".join(f"{a}={s}" for a, s in ici.items())
        raise UserError(f"config.mesh: {shape} = {product} devices, but {per_slice} are available{where}; "
                        f"make the product {per_slice} (or set one axis to -1)")
    return ici, dcn


def mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Total size of each axis (ICI x DCN)."""
    ici, dcn = mesh_layout(cfg, num_devices)
    return {axis: ici[axis] * dcn[axis] for axis in MESH_AXES}


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh over all (or the given) devices with axes (data, stage, fsdp, tensor).

    Multislice (any dcn_* > 1): each axis is DCN-major, so devices that differ along an
    axis's DCN part sit in different slices. Real TPU slices come from the devices'
    slice_index; CPU and virtual devices are cut into slices in order.
    """
    devices = list(devices if devices is not None else jax.devices())
    try:
        ici, dcn = mesh_layout(cfg, len(devices))
    except UserError as e:
        if devices[0].platform == "cpu":  # the usual cause on a laptop or CI machine
            raise UserError(f"{e} (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N "
                            f"emulates N devices)") from None
        raise
    ici_shape = tuple(ici[a] for a in MESH_AXES)
    dcn_shape = tuple(dcn[a] for a in MESH_AXES)
    if math.prod(dcn_shape) > 1:
        try:
            device_array = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)
        except Exception:  # noqa: BLE001 - no slice_index (CPU / virtual devices)
            n = len(MESH_AXES)
            grid = np.asarray(devices).reshape(dcn_shape + ici_shape)
            interleave = [i for pair in zip(range(n), range(n, 2 * n)) for i in pair]
            device_array = grid.transpose(interleave).reshape([d * i for d, i in zip(dcn_shape, ici_shape)])
    else:
        try:
            device_array = mesh_utils.create_device_mesh(ici_shape, devices)
        except Exception:  # noqa: BLE001 - virtual / CPU devices have no physical topology
            device_array = np.asarray(devices).reshape(ici_shape)
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


def param_shardings(model_cfg: ModelConfig, mesh: Mesh, rules: LogicalRules) -> Any:
    """NamedShardings of a Decoder's (unboxed) params, from the logical names they carry."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract_params(model_cfg)), mesh, rules)


def zero_specs(specs: Any, shard_over_fsdp: bool) -> Any:
    """ZeRO: a tree of PartitionSpecs with `fsdp` kept (sharded) or dropped (replicated).

    The rules shard every weight's `embed` dimension over fsdp (ZeRO-3). Stages 0-2 keep
    some trees whole on every fsdp device: params (stages 0-2), gradients (0-1) and the
    Adam moments (0) lose the fsdp axis from their specs and are replicated across it.
    """
    if shard_over_fsdp:
        return specs

    def strip(axes):
        if axes is None:
            return None
        kept = tuple(a for a in (axes if isinstance(axes, tuple) else (axes,)) if a != "fsdp")
        return kept[0] if len(kept) == 1 else (kept or None)

    return jax.tree.map(lambda spec: PartitionSpec(*(strip(a) for a in spec)), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def zero_shardings(shardings: Any, shard_over_fsdp: bool) -> Any:
    """`zero_specs` on a tree of NamedShardings."""
    return jax.tree.map(lambda s: NamedSharding(s.mesh, zero_specs(s.spec, shard_over_fsdp)), shardings,
                        is_leaf=lambda x: isinstance(x, NamedSharding))


def kv_cache_sharding(mesh: Mesh, rules: LogicalRules, ndim: int) -> NamedSharding:
    """[B, S, K(, H)] cache arrays: batch like activations, kv heads over tensor."""
    names = ("batch", "length", "act_kv_heads", None)[:ndim]
    return NamedSharding(mesh, nn.logical_to_mesh_axes(names, rules))


def global_batch(host_batch: dict, sharding: NamedSharding, global_rows: int) -> dict:
    """Assemble the global jax.Array from this host's rows (each host passes only its slice)."""
    def make(x):
        shape = (global_rows, *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, shape)
    return {k: make(v) for k, v in host_batch.items()}
