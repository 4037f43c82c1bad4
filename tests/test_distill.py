"""Distillation loss: the chapter's formula and its worked softmax-at-temperature numbers."""

import jax
import jax.numpy as jnp
import numpy as np

from tpustack.train.distill import distillation_loss


def softmax_T(z, T):
    e = np.exp((z - z.max()) / T)
    return e / e.sum()


def test_chapter_temperature_example():
    z = np.array([3.0, 1.0, -1.0])
    np.testing.assert_allclose(np.round(softmax_T(z, 1), 3), [0.867, 0.117, 0.016])
    # The chapter prints [0.705, 0.259, 0.035] for T=2, which its own softmax_T does not give:
    # exp([3, 1, -1] / 2) normalised is [0.665, 0.245, 0.090]. We follow the formula.
    np.testing.assert_allclose(np.round(softmax_T(z, 2), 3), [0.665, 0.245, 0.090])
    np.testing.assert_allclose(jax.nn.softmax(jnp.asarray(z) / 2), softmax_T(z, 2), rtol=1e-6)


def test_loss_matches_the_formula_on_random_logits():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 5, 11)), rng.normal(size=(2, 5, 11)) * 2
    y = rng.integers(0, 11, (2, 5))
    alpha, temp = 0.3, 2.5
    loss, parts = distillation_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), alpha, temp)
    ce = np.mean([-np.log(softmax_T(s[b, i], 1)[y[b, i]]) for b in range(2) for i in range(5)])
    kl = np.mean([np.sum(softmax_T(t[b, i], temp) * np.log(softmax_T(t[b, i], temp) / softmax_T(s[b, i], temp)))
                  for b in range(2) for i in range(5)])
    np.testing.assert_allclose(float(parts["ce"]), ce, rtol=1e-5)
    np.testing.assert_allclose(float(parts["kl"]), kl, rtol=1e-5)
    np.testing.assert_allclose(float(loss), alpha * ce + (1 - alpha) * temp**2 * kl, rtol=1e-5)


def test_teacher_gets_no_gradient_and_kl_vanishes_when_student_equals_teacher():
    rng = np.random.default_rng(1)
    t = jnp.asarray(rng.normal(size=(1, 3, 7)))
    y = jnp.asarray(rng.integers(0, 7, (1, 3)))
    g_teacher = jax.grad(lambda t_: distillation_loss(t, t_, y, 0.5, 2.0)[0])(t)
    assert float(jnp.max(jnp.abs(g_teacher))) == 0.0
    _, parts = distillation_loss(t, t, y, 0.5, 2.0)
    assert abs(float(parts["kl"])) < 1e-6


def test_distilled_student_moves_towards_the_teacher():
    import dataclasses

    from flax.linen import meta

    from helpers import random_batch, tiny_config
    from tpustack.mesh import make_mesh
    from tpustack.model import Decoder
    from tpustack.train.step import global_batch, make_trainer

    student = tiny_config(mesh__fsdp=4, mesh__data=2, distill__alpha=0.0, distill__temperature=2.0,
                          train__lr=1e-2, train__warmup_steps=1)
    teacher_cfg = dataclasses.replace(student.model, num_layers=1, init_std=0.5)
    teacher = meta.unbox(Decoder(teacher_cfg).init(jax.random.key(9), jnp.zeros((1, 4), jnp.int32))["params"])
    trainer = make_trainer(student, make_mesh(student.mesh), teacher=(teacher_cfg, teacher))
    state = trainer.init(jax.random.key(0))
    batch = global_batch(random_batch(8, 16, 384), trainer.batch_sharding, 8)
    losses = []
    for _ in range(15):
        state, metrics = trainer.train_step(state, batch)
        losses.append(float(metrics["loss"]))  # alpha = 0: T^2 * KL(teacher || student)
    assert losses[-1] < 0.7 * losses[0], losses
