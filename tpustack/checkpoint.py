"""Orbax checkpoints: async saves every N steps, keep K, resume, restore onto any mesh.

Layout: WORKDIR/checkpoints/<step>/{state, meta}. `meta` is JSON: the typed config and
the step, enough to rebuild the model without the original config file. Orbax writes a
step into a temporary directory and renames it only once every file is complete, so a
process killed mid-save leaves a temporary directory that `latest_step` never picks up.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from flax import linen as nn

from tpustack.config import CheckpointConfig, Config, ModelConfig, config_from_dict, config_to_dict
from tpustack.errors import UserError
from tpustack.model import abstract_params


# Bytes in flight while restoring: each array is read into a host buffer, then copied onto
# its devices, so an unbounded restore holds up to two copies of everything at once.
RESTORE_CONCURRENT_GB = 0.25


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def _restore_args(target: Any) -> Any:
    """Read each array straight into its target's sharding and dtype."""
    return jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape, dtype=t.dtype),
                        target)


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
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

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
        orbax's partial restore skips the Adam moments, 2x the params, on disk."""
        params = nn.meta.unbox(abstract_params(cfg))
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, shardings)
        args = ocp.args.PyTreeRestore(item={"params": target}, restore_args={"params": _restore_args(target)},
                                      partial_restore=True)
        return self.manager.restore(self._step(step), args=ocp.args.Composite(state=args))["state"]["params"]

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
