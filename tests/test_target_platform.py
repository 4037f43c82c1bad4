"""Kernels follow the platform a program is compiled for, not the host's: a train step
compiled for a libtpu virtual topology on a CPU machine lowers Pallas attention through
Mosaic (a tpu_custom_call), not interpret mode's CPU stand-in; and a v4 topology has one
device per chip (megacore), as on a Cloud TPU VM. Needs libtpu (pip extra `tpu`)."""

import os

import numpy as np

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from helpers import require_libtpu, tiny_config  # noqa: E402
from tpustack.kernels import compat  # noqa: E402
from tpustack.mesh import make_mesh  # noqa: E402
from tpustack.train.aot import devices_for  # noqa: E402
from tpustack.train.step import make_trainer  # noqa: E402

require_libtpu()  # skips only a missing or unusable libtpu; any other error fails


def test_interpret_follows_the_mesh_platform():
    assert compat.backend() == "cpu" and compat.resolve_interpret(None) is True
    tpu = Mesh(np.array(devices_for("tpu", "v5e:2x2")), ("x",))
    with jax.set_mesh(tpu):
        assert compat.backend() == "tpu" and compat.resolve_interpret(None) is False
        assert compat.resolve_interpret(True) is True  # an explicit choice still wins
    cpu = Mesh(np.array(jax.devices("cpu")[:2]), ("x",))
    with jax.set_mesh(cpu):
        assert compat.backend() == "cpu" and compat.resolve_interpret(None) is True


def test_pallas_attention_lowers_through_mosaic_for_a_tpu_topology():
    config = tiny_config(model__attention_impl="pallas", model__max_seq_len=256, train__seq_len=256,
                         train__batch_size=4, mesh__fsdp=4)
    trainer = make_trainer(config, make_mesh(config.mesh, devices_for("tpu", "v5e:2x2")))
    text = trainer.lower_train_step(4, 256).as_text()
    assert "tpu_custom_call" in text  # the Mosaic kernel, forward and backward
    cpu = make_trainer(config, make_mesh(config.mesh, jax.devices("cpu")[:4]))
    assert "tpu_custom_call" not in cpu.lower_train_step(4, 256).as_text()  # interpret mode on CPU


def test_v4_topology_has_one_device_per_chip():
    devices = devices_for("tpu", "v4:2x2x2")
    assert len(devices) == 8  # 8 chips, each one megacore device with both TensorCores
    assert len({tuple(d.coords) for d in devices}) == 8
    assert all(d.num_cores == 2 for d in devices)
