"""`tpustack export`: the byte tokenizer as tokenizer.json, the complete Hugging Face export,
the orbax serving export (read back without tpustack, and onto another mesh)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tokenizers import Tokenizer

from text_samples import sample_strings
from tpustack.data import ByteTokenizer
from tpustack.interop.tokenizer_json import byte_tokenizer, byte_tokenizer_config, byte_tokenizer_json


def _write_byte_tokenizer(directory) -> None:
    (directory / "tokenizer.json").write_text(json.dumps(byte_tokenizer_json()))
    (directory / "tokenizer_config.json").write_text(json.dumps(byte_tokenizer_config()))


def test_byte_tokenizer_json_encodes_and_decodes_as_the_byte_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    _write_byte_tokenizer(tmp_path)
    ours, texts = ByteTokenizer(), sample_strings(1000, specials=True)
    loaded = byte_tokenizer()
    bare = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))  # knows nothing of split_special_tokens
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (auto.bos_token_id, auto.eos_token_id, len(auto)) == (256, 257, 258)
    for text in texts:
        ids = ours.encode(text).tolist()
        assert loaded.encode(text).ids == ids, text
        assert auto(text)["input_ids"] == ids, text  # add_special_tokens (the default) adds nothing
        assert loaded.decode(ids) == text and auto.decode(ids) == text, text
        if "<s>" not in text and "</s>" not in text:
            assert bare.encode(text).ids == ids, text
    # special ids decode to nothing, as ByteTokenizer.decode drops them
    assert auto.decode([256, 104, 105, 257], skip_special_tokens=True) == "hi" == ours.decode([256, 104, 105, 257])


def _noisy_weights(tokenizer, vocab: int = 384, seed: int = 0):
    """A tiny Weights with every param (norms included) random, so a swapped tensor shows."""
    import jax

    from tpustack.config import ModelConfig
    from tpustack.weights import Weights, init_weights

    cfg = ModelConfig(vocab_size=vocab, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=128,
                      max_seq_len=64)
    weights = init_weights(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    noisy = jax.tree_util.tree_map_with_path(
        lambda path, x: (1.0 if "scale" in str(path[-1]) else 0.0) + 0.15 * rng.standard_normal(x.shape),
        weights.params)
    return Weights(weights.cfg, jax.tree.map(lambda x: np.asarray(x, np.float32), noisy), tokenizer)


def test_hf_export_of_the_byte_model_loads_in_transformers_with_its_logits_tokenizer_and_template(tmp_path):
    import jax.numpy as jnp
    import torch
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from tpustack.data.chat import DEFAULT_CHAT_TEMPLATE
    from tpustack.export import export_hf
    from tpustack.model import Decoder

    weights, out = _noisy_weights(ByteTokenizer()), str(tmp_path / "hf")
    written = export_hf(weights, out)
    assert [p.rsplit("/", 1)[1] for p in written] == ["config.json", "model.safetensors", "generation_config.json",
                                                      "tokenizer.json", "tokenizer_config.json"]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = np.stack([ByteTokenizer().encode("def f(x):\n    return 'é🎉' * x\n")[:24]] * 2)
    ids[1] = ids[1, ::-1]
    ours = np.asarray(Decoder(weights.cfg).apply({"params": weights.params}, jnp.asarray(ids)))
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    assert np.abs(ours).max() > 1.0  # logits far from uniform: a wrong tensor would show
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)
    generation = GenerationConfig.from_pretrained(out)
    assert (generation.bos_token_id, generation.eos_token_id, generation.max_length) == (256, 257, 64)
    for text in sample_strings(1000, seed=1):
        assert tok(text)["input_ids"] == ByteTokenizer().encode(text).tolist(), text
    # the chat template is the server's default, rendered the same way by transformers
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo 👋"}]
    server_env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    prompt = server_env.from_string(DEFAULT_CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == prompt
    assert prompt.endswith("<|assistant|>\n") and "<|user|>\nhéllo 👋\n" in prompt
    chat_ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert list(chat_ids) == ByteTokenizer().encode(prompt).tolist()


def test_hf_export_copies_an_hf_tokenizer_with_its_config_and_template_as_they_came(tmp_path):
    from tokenizers import models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    from tpustack.data import load_tokenizer
    from tpustack.export import export_hf
    from tpustack.weights import load_weights

    source = tmp_path / "tok"
    source.mkdir()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([f"def f{i}(x):\n    return x + {i}\n" for i in range(200)], trainer)
    bpe.save(str(source / "tokenizer.json"))
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
    (source / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "chat_template": template, "model_max_length": 99}))
    weights = _noisy_weights(load_tokenizer(str(source)), vocab=300)
    out = tmp_path / "hf"
    written = export_hf(weights, str(out))
    assert [p.rsplit("/", 1)[1] for p in written][3:] == ["tokenizer.json", "tokenizer_config.json"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user] hi</s>"
    for text in sample_strings(200, seed=2):
        assert tok(text, add_special_tokens=False)["input_ids"] == weights.tokenizer.encode(text).tolist(), text
    config = json.loads((out / "generation_config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (0, 1)
    assert load_weights(str(out)).tokenizer.encode("def f3(x)").tolist() == weights.tokenizer.encode("def f3(x)").tolist()


# Restores an orbax export with orbax + numpy only and saves what it read to an .npz.
_PLAIN_ORBAX_RESTORE = """
import json, sys
import jax, numpy as np, orbax.checkpoint as ocp
out, npz = sys.argv[1], sys.argv[2]
meta = json.load(open(out + "/model_config.json"))
ckpt = ocp.PyTreeCheckpointer()
tree = ckpt.metadata(out + "/params").item_metadata.tree
params = ckpt.restore(out + "/params", restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
flat = {"/".join(k.key for k in path): np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(params)}
assert all(type(x) is np.ndarray for x in flat.values())
assert not any(m == "tpustack" or m.startswith("tpustack.") for m in sys.modules), "tpustack was imported"
np.savez(npz, **flat)
print(meta["model"]["weight_quant"], meta["tokenizer"], len(flat))
"""


def _flat(params) -> dict:
    import jax

    return {"/".join(k.key for k in path): np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(params)}


@pytest.mark.parametrize("tensor_type", ["f32", "int8"])
def test_orbax_export_restores_with_plain_orbax_and_numpy_in_a_process_without_tpustack(tmp_path, tensor_type):
    import os
    import subprocess
    import sys

    from tpustack.export import export_orbax
    from tpustack.model.quant import quantize_params

    weights, out = _noisy_weights(ByteTokenizer()), str(tmp_path / "orbax")
    written = export_orbax(weights, out, tensor_type)
    assert [p.rsplit("/", 1)[1] for p in written] == ["params", "model_config.json"]
    script = tmp_path / "restore.py"
    script.write_text(_PLAIN_ORBAX_RESTORE)
    env = {**os.environ, "PYTHONPATH": ""}  # nothing of this repository on the path
    result = subprocess.run([sys.executable, str(script), out, str(tmp_path / "read.npz")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = _flat(weights.params if tensor_type == "f32" else quantize_params(weights.params, tensor_type))
    assert result.stdout.split()[:2] == [{"f32": "none"}.get(tensor_type, tensor_type), "byte"]
    read = dict(np.load(tmp_path / "read.npz"))
    assert sorted(read) == sorted(expected) and len(read) == int(result.stdout.split()[2])
    for name, value in expected.items():
        assert read[name].dtype == value.dtype, name
        np.testing.assert_array_equal(read[name], value, err_msg=name)
    if tensor_type == "int8":
        assert read["layer_0/attn/q_int8"].dtype == np.int8 and "layer_0/attn/q" not in read


@pytest.mark.parametrize("tensor_type", [None, "int8"])
def test_orbax_export_from_one_mesh_loads_onto_another_with_the_same_logits(tmp_path, tensor_type):
    import dataclasses

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from tpustack.config import MeshConfig
    from tpustack.export import export_orbax
    from tpustack.mesh import make_mesh, param_shardings, rules_for
    from tpustack.model import Decoder
    from tpustack.model.quant import quantize_params
    from tpustack.weights import load_weights, weights_kind

    host = _noisy_weights(ByteTokenizer())
    written_on = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    on_mesh = jax.device_put(host.params, param_shardings(host.cfg, written_on, rules_for("default")))
    out = str(tmp_path / "orbax")
    export_orbax(host._replace(params=on_mesh), out, tensor_type)
    assert weights_kind(out) == "orbax"
    read_on = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    loaded = load_weights(out, mesh=read_on)
    assert loaded.cfg.weight_quant == (tensor_type or "none") and isinstance(loaded.tokenizer, ByteTokenizer)
    leaves = jax.tree.leaves(loaded.params)
    assert all(isinstance(x.sharding, NamedSharding) and x.sharding.mesh.shape == read_on.shape for x in leaves)
    assert any(not x.sharding.is_fully_replicated for x in leaves)
    ref_params = host.params if tensor_type is None else quantize_params(host.params, tensor_type)
    ref_cfg = dataclasses.replace(host.cfg, weight_quant=tensor_type or "none")
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 258, (2, 16)), jnp.int32)
    expected = Decoder(ref_cfg).apply({"params": ref_params}, tokens)
    got = Decoder(loaded.cfg).apply({"params": loaded.params}, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=0)
    # the quantized export is the quantized tree as it was, bit for bit
    for name, value in _flat(ref_params).items():
        np.testing.assert_array_equal(_flat(loaded.params)[name], value, err_msg=name)


def test_orbax_export_to_and_from_a_bucket(gcs_bucket):
    from tpustack import paths
    from tpustack.export import export_orbax
    from tpustack.model.quant import quantize_params
    from tpustack.weights import load_weights, weights_kind

    weights, out = _noisy_weights(ByteTokenizer()), paths.join(gcs_bucket, "serving", "orbax")
    written = export_orbax(weights, out, "int8")
    assert written[:2] == [paths.join(out, "params"), paths.join(out, "model_config.json")]
    assert weights_kind(out) == "orbax"
    loaded = load_weights(out)
    assert loaded.cfg.weight_quant == "int8"
    expected, got = _flat(quantize_params(weights.params, "int8")), _flat(loaded.params)
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_hf_export_refuses_quantized_params(tmp_path):
    import dataclasses

    from tpustack.errors import UserError
    from tpustack.export import export_hf
    from tpustack.model.quant import quantize_params

    weights = _noisy_weights(ByteTokenizer())
    quantized = weights._replace(cfg=dataclasses.replace(weights.cfg, weight_quant="int8"),
                                 params=quantize_params(weights.params, "int8"))
    with pytest.raises(UserError, match="int8-quantized.*--format orbax"):
        export_hf(quantized, str(tmp_path / "hf"))
