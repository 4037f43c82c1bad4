"""Parity with transformers' LlamaForCausalLM: load, run, round-trip, export, errors."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import safetensors.numpy  # noqa: E402

from tpustack.errors import UserError  # noqa: E402
from tpustack.interop import hf  # noqa: E402
from tpustack.model.transformer import Decoder  # noqa: E402

# f32 logits: max |ours - transformers| / max |transformers' logit| (README states this bound).
# Measured 4.4e-7 .. 8.0e-7 over these cases (largest abs difference 2.3e-6, logits up to ~4).
TOL = 1e-6
CASES = {
    "gqa_untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                       rope_theta=50000.0, vocab_size=131),
    "mha_tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                     rope_theta=1e6, vocab_size=257),
    "mqa_wide_heads": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                           tie_word_embeddings=False, rope_theta=10000.0, vocab_size=100),
}


def make_hf_model(case: str, seed: int = 0):
    """A tiny float32 LlamaForCausalLM with every weight, norms included, randomised."""
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                                      rms_norm_eps=1e-5, max_position_embeddings=64,
                                      **CASES[case])
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float().eval()
    # HF initialises norms to ones, which would hide a swapped or missing norm weight.
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn_like(p) * 0.1
            p.copy_(1.0 + noise if "norm" in name else noise)
    return model


def random_tokens(vocab: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, vocab, size=(2, 17), dtype=np.int32)


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("case,scan", [("gqa_untied", False), ("gqa_untied", True),
                                       ("mha_tied", False), ("mha_tied", True),
                                       ("mqa_wide_heads", False)])
def test_logits_match_transformers(tmp_path, case, scan):
    model = make_hf_model(case)
    model.save_pretrained(tmp_path, safe_serialization=True)
    cfg, params = hf.load_hf_checkpoint(str(tmp_path), scan_layers=scan)
    assert cfg.tie_embeddings == CASES[case]["tie_word_embeddings"]
    assert cfg.rope_theta == CASES[case]["rope_theta"]
    assert ("layers" in params) == scan and ("lm_head" in params) != cfg.tie_embeddings
    tokens = random_tokens(cfg.vocab_size)
    ours = Decoder(cfg).apply({"params": params}, tokens)
    err = rel_err(ours, torch_logits(model, tokens))
    print(f"{case} scan={scan}: max rel err {err:.2e}")
    assert err <= TOL


@pytest.mark.parametrize("case,scan", [("gqa_untied", True), ("mha_tied", False)])
def test_round_trip_and_export(tmp_path, case, scan):
    model = make_hf_model(case, seed=3)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    state = safetensors.numpy.load_file(str(tmp_path / "hf" / "model.safetensors"))
    cfg, _ = hf.load_hf_checkpoint(str(tmp_path / "hf"), scan_layers=scan)
    params = hf.params_from_hf_state(state, cfg)
    back = hf.params_to_hf_state(params, cfg)
    assert sorted(back) == sorted(state)
    for name, value in state.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)

    hf.save_hf_checkpoint(str(tmp_path / "out"), params, cfg)
    assert hf.load_hf_checkpoint(str(tmp_path / "out"), scan_layers=scan)[0] == cfg
    exported = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out")).float().eval()
    assert exported.config.rope_parameters["rope_theta"] == cfg.rope_theta
    tokens = random_tokens(cfg.vocab_size)
    err = rel_err(torch_logits(exported, tokens), torch_logits(model, tokens))
    print(f"export {case}: max rel err {err:.2e}")
    assert err <= 1e-6


def test_bfloat16_checkpoint(tmp_path):
    model = make_hf_model("gqa_untied").to(torch.bfloat16)
    model.save_pretrained(tmp_path, safe_serialization=True)
    cfg, params = hf.load_hf_checkpoint(str(tmp_path))
    assert params["embedding"].dtype == np.float32
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    for name, value in hf.params_to_hf_state(params, cfg).items():
        np.testing.assert_array_equal(value, state[name], err_msg=name)
    _, params16 = hf.load_hf_checkpoint(str(tmp_path), param_dtype="bfloat16")
    assert params16["layer_0"]["attn"]["q"].dtype == np.dtype("bfloat16")


def write_config(path, **fields):
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=1, intermediate_size=96,
                                      num_attention_heads=4, vocab_size=100).to_dict()
    config.update(fields)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("field,value", [
    ("attention_bias", True),
    ("mlp_bias", True),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
    ("rope_scaling", {"type": "linear", "factor": 2.0}),
    ("model_type", "gpt2"),
])
def test_unsupported_config_names_field(tmp_path, field, value):
    write_config(tmp_path, **{field: value})
    with pytest.raises(UserError, match=field):
        hf.load_hf_checkpoint(str(tmp_path))


def test_missing_and_misshaped_tensors(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        hf.load_hf_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="config.json"):
        hf.load_hf_checkpoint(str(tmp_path))
    model = make_hf_model("gqa_untied")
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    cfg = hf.config_from_hf(model.config.to_dict())
    missing = dict(state)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(UserError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is missing \(expected shape \[96, 64\]\)"):
        hf.params_from_hf_state(missing, cfg)
    bad = dict(state, **{"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)})
    with pytest.raises(UserError, match=r"k_proj\.weight has shape \[64, 64\], expected \[32, 64\]"):
        hf.params_from_hf_state(bad, cfg)
