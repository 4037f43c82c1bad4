"""Multi-controller JAX: one process per host, all running the same program.

On a Cloud TPU VM slice, `jax.distributed.initialize()` finds the coordinator and the
process ids from the TPU metadata by itself. Elsewhere (GPU clusters, or N processes on
localhost for tests) they come from flags or the environment:

    TPUSTACK_COORDINATOR=host:port TPUSTACK_NUM_PROCESSES=N TPUSTACK_PROCESS_ID=i
    TPUSTACK_LOCAL_DEVICES=k   (CPU only: fake devices per process)

CPU processes exchange collectives over gloo. Must run before anything touches a device.
"""

from __future__ import annotations

import dataclasses
import os

import jax

from tpustack.errors import UserError
from tpustack.platforms import tpu_visible


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
    coordinator: str | None = None
    num_processes: int = 1
    process_id: int = 0
    local_devices: int = 0  # CPU only; 0 keeps XLA's default


def spec_from_env(env: dict[str, str] | None = None) -> DistributedSpec:
    """Read TPUSTACK_* variables; an incomplete or inconsistent set is a UserError."""
    env = dict(os.environ if env is None else env)
    coordinator = env.get("TPUSTACK_COORDINATOR") or None

    def integer(name: str, default: int) -> int:
        text = env.get(name, "")
        if not text:
            return default
        try:
            return int(text)
        except ValueError:
            raise UserError(f"{name}={text!r}: expected an integer") from None

    spec = DistributedSpec(coordinator=coordinator, num_processes=integer("TPUSTACK_NUM_PROCESSES", 1),
                           process_id=integer("TPUSTACK_PROCESS_ID", 0),
                           local_devices=integer("TPUSTACK_LOCAL_DEVICES", 0))
    if spec.num_processes > 1 and not coordinator:
        raise UserError("TPUSTACK_NUM_PROCESSES > 1 needs TPUSTACK_COORDINATOR=host:port")
    if not 0 <= spec.process_id < max(spec.num_processes, 1):
        raise UserError(f"TPUSTACK_PROCESS_ID={spec.process_id} must be in [0, {spec.num_processes})")
    return spec


def initialize(spec: DistributedSpec | None = None) -> None:
    """Start jax.distributed when there is more than one process; a no-op otherwise."""
    spec = spec or spec_from_env()
    if spec.local_devices:
        jax.config.update("jax_num_cpu_devices", spec.local_devices)
    if spec.num_processes <= 1:
        if tpu_visible():
            # The TPU metadata server names the workers and this one's id (one or many hosts).
            jax.distributed.initialize()
        return
    if not tpu_visible():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=spec.coordinator, num_processes=spec.num_processes,
                               process_id=spec.process_id)
