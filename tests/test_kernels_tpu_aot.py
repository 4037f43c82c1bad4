"""Every TPU kernel lowers and compiles through Mosaic for virtual TPU topologies.

Needs libtpu (pip extra `tpu`); skips cleanly without it. One test per kernel and
dtype; each compiles inside shard_map for v5e and v6e (and v4 / v5p where supported).
"""

import os

import jax.numpy as jnp
import pytest

# libtpu takes a machine-wide lock file; compile-only use is safe beside another process.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from helpers import require_libtpu  # noqa: E402
from tpustack.kernels import aot  # noqa: E402

require_libtpu()  # skips only a missing or unusable libtpu; any other error fails
UNSUPPORTED = {("w8a8_matmul", "v4")}  # Mosaic: no int8 MXU operands before v5
KERNELS = list(aot.cases(jnp.float32))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_compiles_for_tpu(kernel, dtype, record_property):
    for gen in aot.TOPOLOGIES:
        if (kernel, gen) in UNSUPPORTED:
            with pytest.raises(Exception, match="Unsupported matmul"):
                aot.compile_case(gen, kernel, dtype)
            continue
        rep = aot.compile_case(gen, kernel, dtype)
        assert rep["vmem_estimate_bytes"] > 0
        # The default scoped VMEM limit is 16 MiB on v5e (32 on v6e): stay well inside.
        assert rep["vmem_estimate_bytes"] < 8 * 2**20, rep
        record_property(f"{gen}_vmem_estimate_bytes", rep["vmem_estimate_bytes"])
