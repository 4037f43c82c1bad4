"""One step's loss and gradients agree across mesh layouts; shardings follow the rules table."""

import jax
import numpy as np
import pytest

from helpers import random_batch, tiny_config
from tpustack.errors import UserError
from tpustack.mesh import make_mesh
from tpustack.train.step import global_batch, make_trainer

LAYOUTS = {
    "1-device": dict(mesh__data=1, mesh__fsdp=1, mesh__tensor=1),
    "data8": dict(mesh__data=8, mesh__fsdp=1, mesh__tensor=1),
    "fsdp8": dict(mesh__data=1, mesh__fsdp=8, mesh__tensor=1),
    "data2-fsdp4": dict(mesh__data=2, mesh__fsdp=4, mesh__tensor=1),
    "fsdp4-tensor2": dict(mesh__data=1, mesh__fsdp=4, mesh__tensor=2),
}


def loss_and_grads(layout: dict, scan: bool = False):
    config = tiny_config(model__scan_layers=scan, **layout)
    devices = jax.devices()[:1] if layout["mesh__fsdp"] == 1 and layout["mesh__data"] == 1 else None
    mesh = make_mesh(config.mesh, devices)
    trainer = make_trainer(config, mesh)
    state = trainer.init(jax.random.key(0))
    batch = global_batch(random_batch(8, 16, 384), trainer.batch_sharding, 8)
    loss, grads = trainer.loss_and_grads(state.params, batch)
    return float(loss), jax.device_get(grads), state


@pytest.fixture(scope="module")
def reference():
    return {scan: loss_and_grads(LAYOUTS["1-device"], scan) for scan in (False, True)}


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("name", [n for n in LAYOUTS if n != "1-device"])
def test_loss_and_grads_match_single_device(reference, name, scan):
    ref_loss, ref_grads, _ = reference[scan]
    loss, grads, _ = loss_and_grads(LAYOUTS[name], scan)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        ref = ref_grads
        for key in path:
            ref = ref[key.key]
        err = np.max(np.abs(g - ref)) / np.max(np.abs(ref))
        assert err <= 1e-5, f"{jax.tree_util.keystr(path)}: relative error {err:.2e}"


def test_param_shardings_follow_rules():
    _, _, state = loss_and_grads(LAYOUTS["fsdp4-tensor2"])
    spec = lambda x: tuple(x.sharding.spec)  # noqa: E731
    attn, mlp = state.params["layer_0"]["attn"], state.params["layer_0"]["mlp"]
    assert spec(attn["q"]) == ("fsdp", "tensor", None)
    assert spec(attn["k"]) == ("fsdp", "tensor", None)
    assert spec(attn["o"]) == ("tensor", None, "fsdp")
    assert spec(mlp["gate"]) == ("fsdp", "tensor")
    assert spec(mlp["down"]) == ("tensor", "fsdp")
    assert spec(state.params["embedding"]) == ("tensor", "fsdp")
    assert spec(state.params["lm_head"]) == ("fsdp", "tensor")
    assert spec(state.params["final_norm"]["scale"]) in ((), (None,))
    # optimizer moments are sharded exactly like their parameters (FSDP / ZeRO-3)
    mu = state.opt_state[1][0].mu
    assert spec(mu["layer_0"]["mlp"]["gate"]) == ("fsdp", "tensor")
    shard = attn["q"].addressable_shards[0].data.shape
    assert shard == (64 // 4, 4 // 2, 16)


def test_mesh_product_mismatch_names_both_numbers():
    config = tiny_config(mesh__data=3, mesh__fsdp=2, mesh__tensor=1)
    with pytest.raises(UserError, match=r"= 6 devices, but 8 are available"):
        make_mesh(config.mesh)


def test_indivisible_dimension_names_both_numbers():
    config = tiny_config(mesh__fsdp=8, model__d_model=36, model__num_heads=2, model__num_kv_heads=2)
    with pytest.raises(UserError, match=r"dimension of 36, not divisible by fsdp=8"):
        make_trainer(config, make_mesh(config.mesh))
