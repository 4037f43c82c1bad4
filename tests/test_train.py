"""Training loop: resume continuity, checkpoints across meshes, fp16 loss scaling."""

import jax
import numpy as np

from helpers import random_batch, tiny_config
from tpustack.checkpoint import Checkpointer
from tpustack.mesh import make_mesh
from tpustack.train.loop import load_trained, train
from tpustack.train.step import global_batch, make_trainer


def test_resume_is_bit_exact(tmp_path):
    config = tiny_config(mesh__fsdp=4, mesh__data=2)
    straight = train(config, str(tmp_path / "straight"), quiet=True)
    first = train(config, str(tmp_path / "resumed"), stop_at_step=10, quiet=True)
    assert Checkpointer(str(tmp_path / "resumed")).latest_step() == 10
    second = train(config, str(tmp_path / "resumed"), quiet=True)
    assert sorted(first.losses) == list(range(10)) and sorted(second.losses) == list(range(10, 20))
    resumed = {**first.losses, **second.losses}
    assert resumed == straight.losses  # bit for bit, not approximately
    assert straight.losses[19] < straight.losses[0]
    assert second.eval_loss == straight.eval_loss


def test_checkpoint_restores_onto_another_mesh(tmp_path):
    config = tiny_config(mesh__fsdp=8, train__steps=3)
    workdir = str(tmp_path / "fsdp8")
    train(config, workdir, quiet=True)
    _, trainer8, state8 = load_trained(workdir, {"data": 1, "fsdp": 8, "tensor": 1})
    assert state8.params["layer_0"]["mlp"]["gate"].sharding.spec[0] == "fsdp"
    _, trainer1, state1 = load_trained(workdir, {"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    assert len(state1.params["layer_0"]["mlp"]["gate"].sharding.device_set) == 1
    assert int(state1.step) == 3
    for a, b in zip(jax.tree.leaves(jax.device_get(state8)), jax.tree.leaves(jax.device_get(state1))):
        np.testing.assert_array_equal(a, b)
    # and the restored single-device model computes the same loss as the sharded one
    batch = random_batch(8, 16, 384)
    loss8, _ = trainer8.loss_and_grads(state8.params, global_batch(batch, trainer8.batch_sharding, 8))
    loss1, _ = trainer1.loss_and_grads(state1.params, global_batch(batch, trainer1.batch_sharding, 8))
    np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-6)


def test_fp16_loss_scaling_skips_overflowing_step_and_regrows():
    config = tiny_config(train__precision="fp16", train__loss_scale_init=2.0**100,
                         train__loss_scale_growth_interval=2, mesh__fsdp=2, mesh__data=4)
    trainer = make_trainer(config, make_mesh(config.mesh))
    state = trainer.init(jax.random.key(0))
    batch = global_batch(random_batch(8, 16, 384), trainer.batch_sharding, 8)
    before = jax.device_get(state)
    # 2**100 * loss overflows fp16 in the backward pass: the step must be skipped.
    state, metrics = trainer.train_step(state, batch)
    assert not bool(metrics["grads_finite"])
    after = jax.device_get(state)
    for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(before.opt_state), jax.tree.leaves(after.opt_state)):
        np.testing.assert_array_equal(a, b)
    assert float(after.loss_scale.scale) == 2.0**99 and int(after.step) == 1
    # the scale keeps halving until gradients are finite, then training moves the weights
    finite_steps = []
    for _ in range(100):
        state, metrics = trainer.train_step(state, batch)
        finite_steps.append(bool(metrics["grads_finite"]))
        if sum(finite_steps) == 2:
            break
    assert finite_steps[-2:] == [True, True]
    scale_at_first_finite = 2.0 ** (99 - len(finite_steps) + 2)
    # two clean steps in a row at growth_interval=2 double the scale
    assert float(state.loss_scale.scale) == 2 * scale_at_first_finite
    moved = jax.device_get(state.params)["layer_0"]["mlp"]["gate"]
    assert not np.array_equal(moved, before.params["layer_0"]["mlp"]["gate"])
    assert np.isfinite(float(metrics["loss"]))


def test_gradient_accumulation_matches_one_big_batch():
    config1 = tiny_config(mesh__fsdp=4, mesh__data=2, train__batch_size=16)
    config4 = tiny_config(mesh__fsdp=4, mesh__data=2, train__batch_size=16, train__grad_accum=2)
    batch = random_batch(16, 16, 384)
    results = []
    for config in (config1, config4):
        trainer = make_trainer(config, make_mesh(config.mesh))
        state = trainer.init(jax.random.key(0))
        state, metrics = trainer.train_step(state, global_batch(batch, trainer.batch_sharding, 16))
        results.append((float(metrics["loss"]), float(metrics["grad_norm"]), jax.device_get(state.params)))
    (l1, g1, p1), (l4, g4, p4) = results
    np.testing.assert_allclose(l4, l1, rtol=1e-5)
    np.testing.assert_allclose(g4, g1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_weight_decay_skips_norms():
    from tpustack.train.optim import decay_mask

    config = tiny_config(model__scan_layers=True)
    trainer = make_trainer(config, make_mesh(config.mesh, jax.devices()[:1]))
    mask = decay_mask(trainer.abstract_state.params)
    assert mask["layers"]["block"]["mlp"]["gate"] is True
    assert mask["layers"]["block"]["attn_norm"]["scale"] is False  # 2-D once stacked, still no decay
    assert mask["final_norm"]["scale"] is False and mask["embedding"] is True


def test_bf16_compute_keeps_fp32_master_weights_and_tracks_f32():
    batch = random_batch(8, 16, 384)
    losses = {}
    for precision in ("f32", "bf16"):
        config = tiny_config(train__precision=precision, mesh__fsdp=8)
        trainer = make_trainer(config, make_mesh(config.mesh))
        state = trainer.init(jax.random.key(0))
        state, metrics = trainer.train_step(state, global_batch(batch, trainer.batch_sharding, 8))
        assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.params))
        losses[precision] = float(metrics["loss"])
    assert losses["bf16"] != losses["f32"]  # really computed in bf16
    np.testing.assert_allclose(losses["bf16"], losses["f32"], rtol=2e-2)


def test_params_only_restore_equals_the_train_state_params(tmp_path):
    """load_weights reads params only, a group at a time (a stacked layer tree leaf by leaf),
    onto one device or a mesh; every array equals the full train state's restore."""
    from tpustack.model import unstack_layers
    from tpustack.weights import load_weights

    config = tiny_config(mesh__fsdp=8, train__steps=2, model__scan_layers=True)
    workdir = str(tmp_path / "scanned")
    train(config, workdir, quiet=True)
    _, _, state = load_trained(workdir, {"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    want = jax.device_get(unstack_layers(state.params, config.model))
    for mesh in (None, make_mesh(config.mesh)):
        cfg, params, tokenizer = load_weights(workdir, mesh)
        assert not cfg.scan_layers and tokenizer.name == "byte"
        assert jax.tree.structure(params) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(want)):
            np.testing.assert_array_equal(a, b)
    assert params["layer_0"]["mlp"]["gate"].sharding.spec[0] == "fsdp"
