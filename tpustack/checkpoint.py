"""Orbax checkpoints: async saves every N steps, keep K, resume, restore onto any mesh.

Layout: WORKDIR/checkpoints/<step>/{state, meta}. `meta` is JSON: the typed config and
the step, enough to rebuild the model without the original config file. Orbax writes a
step into a temporary directory and renames it only once every file is complete, so a
process killed mid-save leaves a temporary directory that `latest_step` never picks up.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from flax import linen as nn

from tpustack import paths
from tpustack.config import CheckpointConfig, Config, ModelConfig, config_from_dict, config_to_dict
from tpustack.errors import UserError
from tpustack.model import abstract_params


# Bytes in flight while restoring: each array is read into a host buffer, then copied onto
# its devices, so an unbounded restore holds up to two copies of everything at once.
RESTORE_CONCURRENT_GB = 0.25


def checkpoint_dir(workdir: str) -> str:
    """WORKDIR/checkpoints: absolute when local (orbax wants that), the URL as given when remote."""
    return paths.join(workdir if paths.is_remote(workdir) else os.path.abspath(workdir), "checkpoints")


def _restore_args(target: Any) -> Any:
    """Read each array straight into its target's sharding and dtype."""
    return jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape, dtype=t.dtype),
                        target)


def _at(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _nest(path: tuple[str, ...], value: Any) -> dict:
    for key in reversed(path):
        value = {key: value}
    return value


def _restore_groups(params: dict) -> list[tuple[str, ...]]:
    """Paths of the subtrees params-only restores read one at a time: each top-level entry,
    split into its children while it holds more than 1/16 of the bytes and a dict to split."""
    total = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(params))

    def split(path: tuple[str, ...], node: Any) -> list[tuple[str, ...]]:
        size = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(node))
        if isinstance(node, dict) and path and size > total / 16:
            return [p for key, child in node.items() for p in split((*path, key), child)]
        return [path]

    return [p for key, child in params.items() for p in split((key,), child)]


class Checkpointer:
    """A CheckpointManager for one workdir."""

    def __init__(self, workdir: str, cfg: CheckpointConfig | None = None, read_only: bool = False):
        cfg = cfg or CheckpointConfig()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, save_interval_steps=max(cfg.every, 1),
            enable_async_checkpointing=cfg.async_save and not read_only, create=not read_only,
            read_only=read_only)
        self.directory = checkpoint_dir(workdir)
        self.periodic = cfg.every > 0
        handlers = {"state": ocp.PyTreeCheckpointHandler(restore_concurrent_gb=RESTORE_CONCURRENT_GB),
                    "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(paths.as_path(self.directory), options=options,
                                             item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, config: Config, force: bool = False) -> bool:
        """Save (asynchronously) if `step` is on the save interval, or always with force."""
        if not force and not self.periodic:
            return False
        meta = {"step": int(step), "config": config_to_dict(config)}
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)), force=force)

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise UserError(f"--checkpoint: no checkpoint in {self.directory}; train first or pass another workdir")
        return step

    def restore(self, abstract_state: Any, shardings: Any, step: int | None = None) -> Any:
        """Restore the state at `step` (latest by default) into the given shardings (any mesh)."""
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract_state, shardings)
        args = ocp.args.PyTreeRestore(item=target, restore_args=_restore_args(target))
        return self.manager.restore(self._step(step), args=ocp.args.Composite(state=args))["state"]

    def restore_params(self, cfg: ModelConfig, shardings: Any, step: int | None = None) -> Any:
        """Only the parameters (no optimizer state), read straight into `shardings` (any mesh).

        The target is eval_shape of the model, so nothing but the params is ever allocated:
        orbax's partial restore skips the Adam moments, 2x the params, on disk. A read holds a
        host and a device copy of what it reads, so it reads a group at a time (the embedding,
        a layer, the head; a stacked layer tree leaf by leaf): the peak is one copy of the
        params plus one group."""
        step = self._step(step)
        params = nn.meta.unbox(abstract_params(cfg))
        out: dict = {}
        for path in _restore_groups(params):
            group, where = _at(params, path), _at(shardings, path)
            target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), group, where)
            item, args = _nest(path, target), _nest(path, _restore_args(target))
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item={"params": item}, restore_args={"params": args}, partial_restore=True)))
            node = out
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = _at(restored["state"]["params"], path)
        return out

    def config(self, step: int | None = None) -> Config:
        """The typed config saved beside a checkpoint."""
        step = self._step(step)
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        return config_from_dict(meta["config"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
