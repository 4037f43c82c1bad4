"""Config loading, overrides and validation: every mistake is a one-line UserError."""

import pytest

from tpustack.config import load_config
from tpustack.errors import UserError

CONFIGS = ["configs/tiny.py", "configs/bench_125m.py", "configs/llama2_7b.py", "configs/llama2_13b.py",
           "configs/llama3_8b.py"]


@pytest.mark.parametrize("path", CONFIGS)
def test_every_config_loads(path):
    config = load_config(path)
    assert config.model.num_params() > 0


def test_parameter_counts_match_the_published_models():
    assert round(load_config("configs/bench_125m.py").model.num_params() / 1e6, 1) == 124.7  # DESIGN.md
    assert round(load_config("configs/llama2_7b.py").model.num_params() / 1e9, 2) == 6.74
    assert round(load_config("configs/llama2_13b.py").model.num_params() / 1e9, 2) == 13.02
    assert round(load_config("configs/llama3_8b.py").model.num_params() / 1e9, 2) == 8.03


def test_overrides_are_typed():
    config = load_config("configs/tiny.py", {"model.num_layers": "3", "train.lr": "1e-3",
                                             "model.scan_layers": "true", "data.source": "text",
                                             "data.path": "x.txt"})
    assert config.model.num_layers == 3 and config.train.lr == 1e-3 and config.model.scan_layers is True


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(UserError, match=r"--config.model.num_layer: unknown key 'num_layer' in config.model; "
                                        r"did you mean model.num_layers\?"):
        load_config("configs/tiny.py", {"model.num_layer": "3"})


@pytest.mark.parametrize("key,value,match", [
    ("model.num_layers", "four", r"expected a int"),
    ("model.num_kv_heads", "4", r"model.num_kv_heads: 4 must divide model.num_heads=6"),
    ("model.remat_policy", "everything", r"model.remat_policy: 'everything' is not 'none' or a jax"),
    ("train.precision", "fp8", r"train.precision: 'fp8' is not one of"),
    ("train.grad_accum", "5", r"train.grad_accum: 5 must be >= 1 and divide train.batch_size=64"),
    ("train.seq_len", "4096", r"train.seq_len: 4096 exceeds model.max_seq_len=1024"),
    ("data.source", "text", r"data.path: data.source='text' needs a path"),
])
def test_invalid_values(key, value, match):
    with pytest.raises(UserError, match=match):
        load_config("configs/tiny.py", {key: value})


def test_missing_config_file():
    with pytest.raises(UserError, match=r"--config: no such file 'configs/nope.py'"):
        load_config("configs/nope.py")


@pytest.mark.parametrize("tied", [False, True])
def test_num_params_counts_the_real_parameter_tree(tied):
    import jax
    import jax.numpy as jnp

    from tpustack.model import Decoder

    cfg = load_config("configs/tiny.py", {"model.tie_embeddings": str(tied)}).model
    shapes = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    assert sum(x.size for x in jax.tree.leaves(shapes)) == cfg.num_params()
