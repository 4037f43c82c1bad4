"""The native CPU matmul (kernels/matmul_cpu.cc) and kernels.matmul's choice of it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpustack.kernels import KernelShapeError, matmul, matmul_impl, pack_weight, packed_matmul
from tpustack.kernels import matmul_cpu

pytestmark = pytest.mark.skipif(matmul_cpu.unavailable() is not None, reason=str(matmul_cpu.unavailable()))


def _case(m, k, n, dtype, seed=0):
    r = np.random.default_rng(seed)
    x = jnp.asarray(r.normal(size=(m, k)), jnp.float32)
    w = jnp.asarray(r.normal(size=(k, n)), dtype)
    want = np.asarray(x, np.float64) @ np.asarray(w.astype(jnp.float32), np.float64)
    return x, w, want


@pytest.mark.parametrize("m,k,n", [(1, 17, 35), (2, 64, 32), (5, 512, 1408), (8, 300, 100), (11, 129, 64),
                                   (3, 1024, 50), (70, 300, 100), (530, 260, 97)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_native_matmul_matches_float64(m, k, n, dtype):
    """Ragged column ends (N % 32), K split over threads (K >= 128) or not; past 8 rows the packed
    GEMM: a ragged last tile (11, 70 rows), a ragged last panel (N % 48), more than one block of
    k (K > 256) and of rows (530 > 512); bf16 weights widened exactly."""
    x, w, want = _case(m, k, n, dtype)
    got = np.asarray(jax.jit(matmul_cpu.matmul_cpu)(x, w))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.sqrt(k) * np.abs(want).max())


def test_a_rows_result_does_not_depend_on_the_batch():
    """Each output is summed over k in the same order whatever M is: row i alone equals row i of 5."""
    x, w, _ = _case(5, 768, 640, "float32", seed=1)
    together = np.asarray(jax.jit(matmul_cpu.matmul_cpu)(x, w))
    for i in range(5):
        alone = np.asarray(jax.jit(matmul_cpu.matmul_cpu)(x[i:i + 1], w))
        np.testing.assert_array_equal(alone[0], together[i])


@pytest.mark.parametrize("m,k,n", [(1, 17, 35), (5, 768, 768), (8, 300, 100), (37, 513, 2000), (530, 260, 97)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_matmul_matches_float64(m, k, n, dtype):
    """Weights packed once ([ceil(N / 48), K, 48], the last panel zero-padded): every M through
    one path; ragged tiles, panels and k blocks as above."""
    x, w, want = _case(m, k, n, dtype, seed=3)
    w_PKC = pack_weight(w)
    assert w_PKC.shape == (-(-n // 48), k, 48) and w_PKC.dtype == w.dtype
    got = np.asarray(jax.jit(packed_matmul, static_argnums=2)(x, w_PKC, n))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.sqrt(k) * np.abs(want).max())


def test_packed_rows_do_not_depend_on_the_batch():
    """A row's sums run over the same blocks in the same order for any M: one row alone equals
    its row among 70 (tiles of 8 and a ragged one) bit for bit."""
    x, w, _ = _case(70, 600, 200, "float32", seed=4)
    w_PKC = pack_weight(w)
    together = np.asarray(jax.jit(packed_matmul, static_argnums=2)(x, w_PKC, 200))
    for i in (0, 9, 69):
        alone = np.asarray(jax.jit(packed_matmul, static_argnums=2)(x[i:i + 1], w_PKC, 200))
        np.testing.assert_array_equal(alone[0], together[i])
    with pytest.raises(ValueError, match="not a packed"):
        packed_matmul(x, w_PKC, 300)


def test_auto_takes_the_native_kernel_for_one_to_eight_rows_on_cpu():
    assert [matmul_impl(m) for m in (1, 2, 8, 9, 64)] == ["cpu", "cpu", "cpu", "xla", "xla"]
    assert matmul_impl(4, impl="xla") == "xla" and matmul_impl(64, impl="cpu") == "cpu"
    assert matmul_impl(4, jnp.float16) == "xla"
    with pytest.raises(KernelShapeError, match="float16"):
        matmul_impl(4, jnp.float16, impl="cpu")
    with pytest.raises(KernelShapeError, match="impl='pallas'"):
        matmul_impl(4, impl="pallas")


def test_matmul_outputs_and_gradients_equal_xla():
    x, w, _ = _case(4, 96, 80, "float32", seed=2)
    y = jax.jit(lambda a, b: matmul(a, b, impl="cpu"))(x, w)
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-5)
    assert y.dtype == jnp.float32 and matmul(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)).dtype == jnp.bfloat16

    def loss(impl):
        return jax.grad(lambda a, b: jnp.sum(jnp.sin(matmul(a, b, impl=impl))), argnums=(0, 1))(x, w)

    for got, want in zip(loss("cpu"), loss("xla")):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
