"""Sampling: greedy, temperature, top-k, top-p per row; reproducible; distributions are right."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpustack.errors import UserError
from tpustack.infer.sampling import SamplingParams, greedy_tokens, sample_tokens, stack_params

LOGITS_V = jnp.log(jnp.asarray([0.05, 0.4, 0.1, 0.25, 0.2]))  # probabilities at temperature 1


def draw(params: SamplingParams, n: int, logits_V=LOGITS_V) -> np.ndarray:
    """n samples from one row's distribution (positions 0..n-1 give fresh keys)."""
    stacked = stack_params([params])
    fn = jax.jit(jax.vmap(lambda pos: sample_tokens(logits_V[None], stacked, pos[None])[0]))
    return np.asarray(fn(jnp.arange(n)))


def frequencies(samples: np.ndarray, vocab: int = 5) -> np.ndarray:
    return np.bincount(samples, minlength=vocab) / len(samples)


def test_greedy_is_argmax_per_row():
    logits_BV = jax.random.normal(jax.random.key(0), (6, 50))
    params = stack_params([SamplingParams(temperature=0.0, seed=i) for i in range(6)])
    out = sample_tokens(logits_BV, params, jnp.zeros(6, jnp.int32))
    np.testing.assert_array_equal(out, np.argmax(logits_BV, axis=-1))


def test_temperature_one_follows_the_softmax():
    freq = frequencies(draw(SamplingParams(temperature=1.0, seed=3), 20000))
    np.testing.assert_allclose(freq, np.exp(LOGITS_V), atol=0.015)


def test_top_k_keeps_the_k_most_likely_renormalised():
    freq = frequencies(draw(SamplingParams(temperature=1.0, top_k=2, seed=1), 20000))
    expected = np.array([0, 0.4, 0, 0.25, 0]) / 0.65
    np.testing.assert_allclose(freq, expected, atol=0.015)


def test_top_p_keeps_the_smallest_set_reaching_p():
    # sorted: 0.4, 0.25, 0.2, 0.1, 0.05 -> p=0.6 needs {0.4, 0.25}; p=0.7 adds 0.2
    freq = frequencies(draw(SamplingParams(temperature=1.0, top_p=0.6, seed=2), 20000))
    np.testing.assert_allclose(freq, np.array([0, 0.4, 0, 0.25, 0]) / 0.65, atol=0.015)
    freq = frequencies(draw(SamplingParams(temperature=1.0, top_p=0.7, seed=2), 20000))
    np.testing.assert_allclose(freq, np.array([0, 0.4, 0, 0.25, 0.2]) / 0.85, atol=0.015)


def test_low_temperature_sharpens():
    freq = frequencies(draw(SamplingParams(temperature=0.25, seed=5), 20000))
    expected = np.exp(LOGITS_V) ** 4 / np.sum(np.exp(LOGITS_V) ** 4)  # p^(1/T), renormalised
    np.testing.assert_allclose(freq, expected, atol=0.015)


def test_rows_are_independent_of_their_batch_and_reproducible():
    logits_BV = jax.random.normal(jax.random.key(1), (3, 100))
    rows = [SamplingParams(temperature=1.0, seed=11), SamplingParams(temperature=0.7, top_k=5, seed=12),
            SamplingParams(temperature=0.9, top_p=0.5, seed=13)]
    pos = jnp.asarray([4, 9, 2], jnp.int32)
    together = sample_tokens(logits_BV, stack_params(rows), pos)
    again = sample_tokens(logits_BV, stack_params(rows), pos)
    np.testing.assert_array_equal(together, again)
    for b in range(3):
        alone = sample_tokens(logits_BV[b:b + 1], stack_params([rows[b]]), pos[b:b + 1])
        assert int(alone[0]) == int(together[b])


@pytest.mark.parametrize("params,field", [
    (SamplingParams(top_p=0.0), "--top-p 0.0"), (SamplingParams(top_p=1.5), "--top-p 1.5"),
    (SamplingParams(temperature=-1), "--temperature -1"), (SamplingParams(top_k=-2), "--top-k -2"),
])
def test_bad_sampling_parameters(params, field):
    with pytest.raises(UserError, match=field):
        stack_params([params])


def test_greedy_tokens_is_argmax_with_ties_to_the_first():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(16, 300)), jnp.float32)
    logits = logits.at[3, 7].set(9.0).at[3, 200].set(9.0)  # a tie: the first index wins, as argmax
    np.testing.assert_array_equal(greedy_tokens(logits), jnp.argmax(logits, axis=-1))
    assert int(greedy_tokens(logits)[3]) == 7
