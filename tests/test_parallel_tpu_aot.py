"""The sharded train step compiles for real TPU topologies, with no TPU: libtpu's virtual
devices and the TPU compiler (pip extra `tpu`). One layout per topology the issue names,
plus a pipelined one; each reports per-chip HBM and FLOPs through `compile_check`."""

import os

import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from helpers import require_libtpu, tiny_config  # noqa: E402
from tpustack.train.aot import compile_check  # noqa: E402

require_libtpu()  # skips only a missing or unusable libtpu; any other error fails

LAYOUTS = {
    "v5e:2x2 fsdp=4": ("v5e:2x2", dict(mesh__fsdp=4)),
    "v5p:2x2x1 fsdp=2 x tensor=2": ("v5p:2x2x1", dict(mesh__fsdp=2, mesh__tensor=2)),
    "v6e:2x2 data=2 x fsdp=2, ZeRO-1": ("v6e:2x2", dict(mesh__data=2, mesh__fsdp=2, parallel__zero_stage=1)),
    "v5p:2x2x2 stage=2 x fsdp=2 x tensor=2": ("v5p:2x2x2", dict(mesh__stage=2, mesh__fsdp=2, mesh__tensor=2,
                                                                 model__scan_layers=True, model__num_layers=4)),
    "v5e:2x4 stage=4 x data=2, circular": ("v5e:2x4", dict(mesh__stage=4, mesh__data=2, mesh__fsdp=1,
                                                           model__scan_layers=True, model__num_layers=8,
                                                           parallel__microbatches=8, parallel__pipeline_repeats=2)),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_train_step_compiles_for_tpu(name):
    topology, overrides = LAYOUTS[name]
    config = tiny_config(train__batch_size=16, **overrides)
    report = compile_check(config, topology)
    assert report["compiled"] and report["fits"], report
    assert 0 < report["xla_total_bytes"] < report["hbm_bytes"]
    assert report["flops_per_step_per_chip"] > 0
    sizes = {k[len("mesh__"):]: v for k, v in overrides.items() if k.startswith("mesh__")}
    assert all(report["mesh"][axis] == size for axis, size in sizes.items())
    if report["mesh"]["stage"] > 1:
        s, m, v = report["mesh"]["stage"], config.parallel.microbatches, config.parallel.pipeline_repeats
        assert report["pipeline_bubble"] == pytest.approx((s - 1) / (v * m + s - 1))
