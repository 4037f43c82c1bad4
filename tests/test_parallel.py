"""3D parallelism on 8 CPU devices: GPipe over `stage`, ZeRO 0-3 over `fsdp`, Megatron over
`tensor`, and multislice (DCN) meshes. Every layout is checked against the one-device model."""

import jax
import numpy as np
import pytest

from helpers import random_batch, tiny_config
from tpustack.config import MeshConfig
from tpustack.errors import UserError
from tpustack.mesh import make_mesh, mesh_layout
from tpustack.train.pipeline import pipeline_bubble
from tpustack.plan.hlo import collectives, summary
from tpustack.train.step import global_batch, make_trainer

BATCH, SEQ, VOCAB = 16, 16, 384


def build(**kw):
    config = tiny_config(model__scan_layers=True, model__num_layers=4, train__batch_size=BATCH, **kw)
    sizes = [int(kw.get(f"mesh__{p}{a}", 1)) for a in ("data", "stage", "fsdp", "tensor") for p in ("", "dcn_")]
    mesh = make_mesh(config.mesh, jax.devices()[:int(np.prod(sizes))])
    return config, make_trainer(config, mesh)


def loss_and_grads(**kw):
    _, trainer = build(**kw)
    state = trainer.init(jax.random.key(0))
    batch = global_batch(random_batch(BATCH, SEQ, VOCAB), trainer.batch_sharding, BATCH)
    loss, grads = trainer.loss_and_grads(state.params, batch)
    return float(loss), jax.device_get(grads)


def assert_close(got, want, tol=1e-5):
    loss, grads = got
    ref_loss, ref_grads = want
    assert abs(loss - ref_loss) <= tol * abs(ref_loss)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        err = np.max(np.abs(g - r)) / np.max(np.abs(r))
        assert err <= tol, f"{jax.tree_util.keystr(path)}: relative error {err:.2e}"


@pytest.fixture(scope="module")
def reference():
    return loss_and_grads(mesh__fsdp=1)


PIPELINES = {
    "stage2-m4": dict(mesh__stage=2, parallel__microbatches=4),
    "stage2-m8": dict(mesh__stage=2, parallel__microbatches=8),
    "stage4-m4": dict(mesh__stage=4, parallel__microbatches=4),
    "stage4-m8": dict(mesh__stage=4, parallel__microbatches=8),
    "stage2-fsdp2-data2-m4": dict(mesh__stage=2, mesh__fsdp=2, mesh__data=2, parallel__microbatches=4),
    "stage4-fsdp2-m8": dict(mesh__stage=4, mesh__fsdp=2, parallel__microbatches=8),
    "stage2-tensor2-data2-m4": dict(mesh__stage=2, mesh__tensor=2, mesh__data=2, mesh__fsdp=1,
                                    parallel__microbatches=4),
    # circular: 2 chunks of 1 layer per stage, each microbatch goes round the 2 stages twice
    "circular-stage2-v2-m4": dict(mesh__stage=2, parallel__microbatches=4, parallel__pipeline_repeats=2),
    "circular-stage2-v2-m2-fsdp2-data2": dict(mesh__stage=2, mesh__fsdp=2, mesh__data=2, parallel__microbatches=2,
                                              parallel__pipeline_repeats=2),
    "circular-stage2-v2-m4-tensor2-fsdp2": dict(mesh__stage=2, mesh__tensor=2, mesh__fsdp=2,
                                                parallel__microbatches=4, parallel__pipeline_repeats=2),
}


@pytest.mark.parametrize("name", PIPELINES)
def test_pipeline_matches_the_unpipelined_model(reference, name):
    kw = {"mesh__fsdp": 1, **PIPELINES[name]}
    assert_close(loss_and_grads(**kw), reference)


def test_pipeline_splits_layers_over_stage_and_shifts_with_collective_permutes():
    _, trainer = build(mesh__stage=4, mesh__fsdp=2, parallel__microbatches=8)
    q = trainer.state_shardings.params["layers"]["block"]["attn"]["q"]
    assert q.spec[0] == "stage" and q.shard_shape((4, 64, 4, 16)) == (1, 32, 4, 16)
    hlo = trainer.lower_train_step(BATCH, SEQ).compile().as_text()
    ticks = 8 + 4 - 1
    per_tick = [c for c in collectives(hlo) if c.runs == ticks]
    permutes = [c for c in per_tick if c.kind == "collective-permute"]
    # forward and backward shift [b, T, D] activations between neighbouring stages every tick
    fwd = [c for c in permutes if "transpose" not in c.op_name]
    assert fwd and len(permutes) > len(fwd)
    b = BATCH // 8 // 2  # microbatch rows per fsdp shard
    # only microbatch activations move per tick: the weight gradients are reduced once, after the loop
    assert all(c.operand_bytes == b * SEQ * 64 * 4 for c in per_tick)
    assert pipeline_bubble(4, 8) == pytest.approx(3 / 11) and pipeline_bubble(1, 4) == 0


def test_circular_pipeline_runs_v_m_plus_s_minus_1_ticks():
    _, trainer = build(mesh__stage=2, mesh__fsdp=4, parallel__microbatches=4, parallel__pipeline_repeats=2)
    colls = collectives(trainer.lower_train_step(BATCH, SEQ).compile().as_text())
    ticks = 2 * 4 + 2 - 1
    assert {c.runs for c in colls if c.kind == "collective-permute" and c.runs > 1} == {ticks}
    assert pipeline_bubble(2, 4, 2) == pytest.approx(1 / 9) and pipeline_bubble(2, 4) == pytest.approx(1 / 5)


def test_pipeline_train_steps_match():
    losses = {}
    for name, kw in {"flat": dict(mesh__fsdp=8), "pipe": dict(mesh__stage=2, mesh__fsdp=4)}.items():
        _, trainer = build(**kw)
        state = trainer.init(jax.random.key(0))
        for step in range(3):
            batch = global_batch(random_batch(BATCH, SEQ, VOCAB, seed=step), trainer.batch_sharding, BATCH)
            state, metrics = trainer.train_step(state, batch)
            losses.setdefault(name, []).append(float(metrics["loss"]))
    np.testing.assert_allclose(losses["pipe"], losses["flat"], rtol=1e-5)


def test_pipeline_config_errors():
    with pytest.raises(UserError, match="model.scan_layers"):
        tiny_config(mesh__stage=2)
    with pytest.raises(UserError, match="mesh.stage"):
        tiny_config(mesh__stage=3, model__scan_layers=True)
    with pytest.raises(UserError, match="parallel.microbatches"):
        tiny_config(mesh__stage=2, model__scan_layers=True, parallel__microbatches=3)
    with pytest.raises(UserError, match="parallel.pipeline_repeats"):
        tiny_config(mesh__stage=2, model__scan_layers=True, model__num_layers=4, parallel__pipeline_repeats=4)
    with pytest.raises(UserError, match="multiple of the 2 stages"):
        tiny_config(mesh__stage=2, model__scan_layers=True, model__num_layers=4, parallel__pipeline_repeats=2,
                    parallel__microbatches=1)


# ---------------------------------------------------------------------------- ZeRO
def test_zero_stage_shardings():
    # stage: (params sharded, Adam moments sharded); gradients are a constraint inside the step
    for stage, (params, moments) in {0: (False, False), 1: (False, True), 2: (False, True), 3: (True, True)}.items():
        _, trainer = build(mesh__fsdp=8, parallel__zero_stage=stage)
        s = trainer.state_shardings
        gate = s.params["layers"]["block"]["mlp"]["gate"].spec
        mu = s.opt_state[1][0].mu["layers"]["block"]["mlp"]["gate"].spec
        assert ("fsdp" in gate) == params, (stage, gate)
        assert ("fsdp" in mu) == moments, (stage, mu)


def test_zero_stages_train_identically():
    finals = {}
    for stage in range(4):
        _, trainer = build(mesh__fsdp=8, parallel__zero_stage=stage)
        state = trainer.init(jax.random.key(0))
        losses = []
        for step in range(2):
            batch = global_batch(random_batch(BATCH, SEQ, VOCAB, seed=step), trainer.batch_sharding, BATCH)
            state, metrics = trainer.train_step(state, batch)
            losses.append(float(metrics["loss"]))
        finals[stage] = (losses, jax.device_get(state.params["layers"]["block"]["mlp"]["gate"]))
    for stage in (1, 2, 3):
        np.testing.assert_allclose(finals[stage][0], finals[0][0], rtol=1e-6)
        np.testing.assert_allclose(finals[stage][1], finals[0][1], rtol=1e-5, atol=1e-7)


def test_zero_stages_show_in_compiled_memory():
    """Per-device bytes fall 0 > 1 > 2 > 3, each step by what that stage newly shards (7/8 of it),
    and tpustack.plan.memory's estimate of each stage is within 10% of XLA's."""
    from tpustack.config import load_config
    from tpustack.plan.memory import train_memory

    total = {}
    for stage in range(4):
        config = load_config("configs/tiny.py", {"model.scan_layers": "True", "mesh.fsdp": "8",
                                                 "parallel.zero_stage": str(stage), "train.batch_size": "16",
                                                 "train.seq_len": "64"})
        trainer = make_trainer(config, make_mesh(config.mesh))
        m = trainer.lower_train_step(16, 64).compile().memory_analysis()
        total[stage] = m.argument_size_in_bytes + m.temp_size_in_bytes
        est = train_memory(config.model, "f32", {"fsdp": 8}, stage, 16, 64, "none", backend="cpu")
        assert est.total == pytest.approx(total[stage], rel=0.10), (stage, est.total, total[stage])
    tree = 4 * config.model.num_params()  # one fp32 parameter-shaped tree
    expected = {1: 2 * tree * 7 / 8, 2: tree * 7 / 8, 3: tree * 7 / 8}  # Adam mu+nu, grads, params
    for stage, saving in expected.items():
        got = total[stage - 1] - total[stage]
        if stage < 3:
            assert got == pytest.approx(saving, rel=0.05), (stage, got, saving)
        else:  # ZeRO-3 also drops the update's whole-size temporaries of the params
            assert saving * 0.95 <= got <= saving * 1.5, (stage, got, saving)


# ---------------------------------------------------------------------------- tensor parallelism
def test_tensor_parallel_collectives_per_layer():
    """Megatron over tensor=2 (data=4): per layer, 2 all-reduces of [b, T, D] forward (after the
    row-parallel o and down projections) and 2 backward (input gradients of the column-parallel
    q/k/v and gate/up); the vocab-parallel loss reduces [b, T] values and never gathers logits."""
    config, trainer = build(mesh__data=4, mesh__fsdp=1, mesh__tensor=2)
    colls = collectives(trainer.lower_train_step(BATCH, SEQ).compile().as_text())
    layers = config.model.num_layers
    b, d, v = BATCH // 4, config.model.d_model, config.model.vocab_size
    act = b * SEQ * d * 4
    tensor = [c for c in colls if c.group == 2]
    in_loops = [c for c in tensor if c.runs == layers]
    fwd = [c for c in in_loops if "transpose" not in c.op_name]
    bwd = [c for c in in_loops if "transpose" in c.op_name]
    assert [c.kind for c in fwd] == ["all-reduce"] * 2 and all(c.operand_bytes == act for c in fwd)
    assert [c.kind for c in bwd] == ["all-reduce"] * 2
    # XLA all-reduces the q, k and v (and gate, up) input-gradient partials before adding them:
    # 3 + 2 activations where Megatron's fused projections move 1 + 1.
    assert sum(c.operand_bytes for c in bwd) == 5 * act
    assert not any(c.kind == "all-gather" for c in colls)
    assert max(c.operand_bytes for c in tensor) < b * SEQ * v * 4  # no [b, T, V] logits move
    assert summary(colls)["all-reduce"]["runs"] >= 4 * layers


def test_tensor_parallel_matches_reference(reference):
    assert_close(loss_and_grads(mesh__data=2, mesh__fsdp=2, mesh__tensor=2), reference)


def test_sequence_rules_table_matches_reference(reference):
    assert_close(loss_and_grads(mesh__data=4, mesh__fsdp=1, mesh__tensor=2, mesh__rules="sequence"), reference)


# ---------------------------------------------------------------------------- multislice
def test_multislice_mesh_is_dcn_major():
    cfg = MeshConfig(data=1, fsdp=2, tensor=2, dcn_data=2)
    assert mesh_layout(cfg, 8) == ({"data": 1, "stage": 1, "fsdp": 2, "tensor": 2},
                                   {"data": 2, "stage": 1, "fsdp": 1, "tensor": 1})
    mesh = make_mesh(cfg)
    assert dict(mesh.shape) == {"data": 2, "stage": 1, "fsdp": 2, "tensor": 2}
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    assert set(ids[0].ravel()) == {0, 1, 2, 3} and set(ids[1].ravel()) == {4, 5, 6, 7}  # a slice per data index
    fill = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1, dcn_fsdp=2))
    assert dict(fill.shape)["fsdp"] == 8 and mesh_layout(MeshConfig(fsdp=-1, dcn_fsdp=2), 8)[0]["fsdp"] == 4
    with pytest.raises(UserError, match="dcn_"):
        make_mesh(MeshConfig(dcn_data=3))
    with pytest.raises(UserError, match="per slice"):
        make_mesh(MeshConfig(data=1, fsdp=4, tensor=2, dcn_data=2))


def test_multislice_training_matches_reference(reference):
    assert_close(loss_and_grads(mesh__data=1, mesh__fsdp=4, mesh__dcn_data=2), reference)


def test_hlo_reader_multiplies_loop_trip_counts():
    """CPU annotates known_trip_count; TPU does not, so the bound is read off the condition."""
    hlo = """HloModule m

%cond (p: (s32[], f32[4])) -> pred[] {
  %c = s32[]{:T(128)} constant(6)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %ar = f32[4]{0:T(256)} all-reduce(%x), channel_id=1, replica_groups=[2,4]<=[8], to_apply=%add
  %cp = f32[4]{0} collective-permute(%x), channel_id=2, source_target_pairs={{0,1}}
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %w = (s32[], f32[4]) while(%t), condition=%cond, body=%body
  %ag = f32[16]{0} all-gather(%a), channel_id=3, replica_groups={{0,1,2,3}}, dimensions={0}
}
"""
    by_kind = {c.kind: c for c in collectives(hlo)}
    assert by_kind["all-reduce"].runs == 6 and by_kind["all-reduce"].group == 4
    assert by_kind["all-reduce"].moved_bytes == pytest.approx(2 * 3 / 4 * 16)
    assert by_kind["collective-permute"].runs == 6 and by_kind["all-gather"].runs == 1
    assert by_kind["all-gather"].moved_bytes == pytest.approx(3 / 4 * 64)
    cpu = hlo.replace("body=%body", 'body=%body, backend_config={"known_trip_count":{"n":"3"}}')
    assert {c.runs for c in collectives(cpu) if c.kind != "all-gather"} == {3}
