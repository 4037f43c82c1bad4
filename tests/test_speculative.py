"""Speculative decoding: greedy equals target-only; sampling follows the target's distribution."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpustack.config import ModelConfig
from tpustack.errors import UserError
from tpustack.infer import speculative
from tpustack.infer.decode import Generator, finished_tokens
from tpustack.infer.sampling import SamplingParams, stack_params
from tpustack.infer.speculative import SpeculativeGenerator, acceptance_stats
from tpustack.plan.cost import tokens_per_round
from tpustack.model import Decoder

TARGET = ModelConfig(vocab_size=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=128,
                     max_seq_len=96, init_std=0.4)
DRAFT = dataclasses.replace(TARGET, num_layers=1, d_model=32, num_heads=2, num_kv_heads=1, ffn_dim=64)


def init(cfg, seed):
    from flax.linen import meta

    return meta.unbox(Decoder(cfg).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"])


@pytest.fixture(scope="module")
def target():
    return init(TARGET, 0)


def perturbed(params, scale, seed):
    """A 'real' draft: the target's weights plus noise, so it agrees often but not always."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jnp.std(x) * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])


def prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 64, rng.integers(3, 20)).tolist() for _ in range(n)]


@pytest.mark.parametrize("draft_kind", ["random", "self", "real"])
def test_greedy_speculative_equals_greedy_target(target, draft_kind):
    if draft_kind == "random":
        draft_cfg, draft = DRAFT, init(DRAFT, 7)
    elif draft_kind == "self":
        draft_cfg, draft = TARGET, target
    else:
        draft_cfg, draft = TARGET, perturbed(target, 0.05, 1)
    batch = prompts(12, seed=3)
    plain = Generator(TARGET, target).generate(batch, 24)
    spec = SpeculativeGenerator(TARGET, target, draft_cfg=draft_cfg, draft_params=draft, k=4)
    state = spec.start(batch, [24] * len(batch), [SamplingParams()] * len(batch))
    state = spec.decode(state, stack_params([SamplingParams()] * len(batch)), 24)
    assert finished_tokens(state) == plain
    rate = float(np.sum(state.accepted_B) / np.sum(state.drafted_B))
    if draft_kind == "self":
        assert rate == 1.0
    elif draft_kind == "random":
        assert rate < 0.3
    else:
        assert 0.2 < rate < 1.0


SMALL_TARGET = dataclasses.replace(TARGET, vocab_size=16, init_std=0.5)
SMALL_DRAFT = dataclasses.replace(DRAFT, vocab_size=16, init_std=0.01)  # near-uniform: unlike the target


def marginal_of_second_token(gen, prompt, n_rows):
    """Empirical distribution of the 2nd generated token over n_rows seeds (1st comes from prefill;
    the 2nd is the first one a speculative round produces)."""
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(n_rows)]
    out = gen.generate([prompt] * n_rows, 3, params)
    return np.bincount([o[1] for o in out], minlength=SMALL_TARGET.vocab_size) / n_rows


def exact_marginal_of_second_token(params, prompt):
    model = Decoder(SMALL_TARGET)
    p1 = np.asarray(jax.nn.softmax(model.apply({"params": params}, jnp.asarray([prompt]))[0, -1]))
    batch = jnp.asarray([prompt + [t] for t in range(SMALL_TARGET.vocab_size)])
    p2 = np.asarray(jax.nn.softmax(model.apply({"params": params}, batch)[:, -1]))
    return p1 @ p2


def total_variation(a, b):
    return 0.5 * np.sum(np.abs(a - b))


@pytest.mark.parametrize("correct", [True, False])
def test_speculative_sampling_follows_the_target_distribution(monkeypatch, correct):
    if not correct:  # the classic bug: resample from p instead of max(0, p - q) -> biased towards q
        monkeypatch.setattr(speculative, "residual", lambda p, q: p)
    target, draft = init(SMALL_TARGET, 3), init(SMALL_DRAFT, 11)
    prompt = [5, 9, 2]
    exact = exact_marginal_of_second_token(target, prompt)
    spec = SpeculativeGenerator(SMALL_TARGET, target, draft_cfg=SMALL_DRAFT, draft_params=draft, k=2)
    tv = total_variation(marginal_of_second_token(spec, prompt, 20000), exact)
    # 20000 draws over 16 tokens: sampling noise in TV is ~0.01; the bug costs ~0.08.
    if correct:
        assert tv < 0.03, tv
    else:
        assert tv > 0.05, tv


def test_acceptance_rate_and_tokens_per_round_follow_the_formula(target):
    draft = perturbed(target, 0.05, 2)
    spec = SpeculativeGenerator(TARGET, target, draft_cfg=TARGET, draft_params=draft, k=4)
    batch = prompts(16, seed=4)
    n = [40] * len(batch)
    state = spec.start(batch, n, [SamplingParams()] * len(batch))
    sampling = stack_params([SamplingParams()] * len(batch))
    rounds = 0
    while not bool(jnp.all(state.done_B)):
        state = spec.decode(state, sampling, 1)
        rounds += 1
    stats = acceptance_stats(state, 4)
    assert 1.0 < stats["tokens_per_round"] <= 5.0 and 0.0 < stats["alpha"] < 1.0
    # the formula assumes independent acceptances; a real draft is close to it, not equal
    error = abs(stats["tokens_per_round"] / stats["predicted_tokens_per_round"] - 1)
    assert error < 0.15, stats
    assert tokens_per_round(0.8, 4) == pytest.approx(3.3616)


def test_draft_must_share_the_vocabulary(target):
    other = dataclasses.replace(DRAFT, vocab_size=65)
    with pytest.raises(UserError, match=r"--draft: the draft's vocabulary has 65 tokens, the target's 64"):
        SpeculativeGenerator(TARGET, target, draft_cfg=other, draft_params=init(other, 0))
