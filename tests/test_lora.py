"""LoRA / QLoRA (tpustack.compress.lora, `tpustack finetune`): the adapter math against merged
weights computed here in numpy, a short fine-tune on new text through the CLI driver (loss
falls, trainable state is the adapters' alone), the merged checkpoint's logits, and peft's
PeftModel on the HF export of the base giving the adapter model's logits."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from tpustack.checkpoint import Checkpointer
from tpustack.compress import lora
from tpustack.compress.finetune import FinetuneOptions, finetune, load_finetuned, make_config
from tpustack.config import ModelConfig
from tpustack.data import ByteTokenizer
from tpustack.model import Decoder
from tpustack.weights import init_weights, load_weights

CFG = ModelConfig(vocab_size=384, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=128,
                  max_seq_len=64)
TOKENS = np.random.default_rng(0).integers(0, 384, (2, 24)).astype(np.int32)


def random_adapters(cfg: ModelConfig, seed: int = 1) -> dict:
    """Adapters with a nonzero B, so the update is visible in the logits."""
    adapters = lora.init_adapters(cfg, seed)
    keys = iter(jax.random.split(jax.random.key(seed), 100))
    return jax.tree.map(lambda a: a + 0.05 * jax.random.normal(next(keys), a.shape), adapters)


def logits(cfg: ModelConfig, params: dict) -> np.ndarray:
    return np.asarray(jax.jit(lambda p: Decoder(cfg).apply({"params": p}, TOKENS))(params))


def save_workdir(path: str, cfg: ModelConfig, params: dict) -> None:
    """A params-only tpustack workdir of (cfg, params) with the byte tokenizer."""
    opts = FinetuneOptions(checkpoint=path, workdir=path, rank=1, seq_len=32)
    config = make_config(opts, cfg, ByteTokenizer())
    config = dataclasses.replace(config, model=cfg)
    ckpt = Checkpointer(path)
    ckpt.save(0, {"params": params}, config, force=True)
    ckpt.close()


def test_adapter_model_equals_merged_weights_computed_in_numpy():
    base = init_weights(CFG).params
    cfg = lora.lora_config(CFG, rank=4, alpha=8.0, targets="q,v,o,down")
    adapters = random_adapters(cfg)
    np.testing.assert_array_equal(logits(cfg, lora.join_params(base, lora.zero_update(adapters))), logits(CFG, base))
    # numpy reference: W [*in, *out] + (alpha / r) A [K, r] B [r, N], reshaped
    merged = jax.tree.map(np.asarray, base)
    for i in range(CFG.num_layers):
        for block, name in (("attn", "q"), ("attn", "v"), ("attn", "o"), ("mlp", "down")):
            ad = adapters[f"layer_{i}"][block]
            w = merged[f"layer_{i}"][block][name]
            delta = np.asarray(ad[f"{name}_lora_a"]) @ np.asarray(ad[f"{name}_lora_b"])
            merged[f"layer_{i}"][block][name] = w + 2.0 * delta.reshape(w.shape)
        assert set(adapters[f"layer_{i}"]["attn"]) == {"q_lora_a", "q_lora_b", "v_lora_a", "v_lora_b",
                                                      "o_lora_a", "o_lora_b"}
    want = logits(CFG, merged)
    got = logits(cfg, lora.join_params(base, adapters))
    assert np.abs(want - logits(CFG, base)).max() > 0.05  # the adapters matter
    np.testing.assert_allclose(got, want, atol=2e-5)
    plain, ours = lora.merge_adapters(cfg, lora.join_params(base, adapters))
    assert plain.lora_rank == 0
    np.testing.assert_allclose(logits(plain, ours), want, atol=2e-5)


def test_nf4_base_merges_into_its_dequantized_weights():
    from tpustack.model.quant import quantize_params

    base = init_weights(CFG).params
    cfg = dataclasses.replace(lora.lora_config(CFG, rank=4, alpha=8.0, targets="q,k,v,o,gate,up,down"),
                              weight_quant="nf4")
    params = lora.join_params(quantize_params(base, "nf4"), random_adapters(cfg))
    want = logits(cfg, params)
    plain, merged = lora.merge_adapters(cfg, params)
    assert plain.weight_quant == "none"
    np.testing.assert_allclose(logits(plain, merged), want, atol=2e-5)
    # the NF4 base is not the float one: 4-bit levels, within a block's absmax / 8 of it
    w, q = np.asarray(base["layer_1"]["attn"]["o"]), np.asarray(merged["layer_1"]["attn"]["o"])
    delta = np.asarray(params["layer_1"]["attn"]["o_lora_a"]) @ np.asarray(params["layer_1"]["attn"]["o_lora_b"])
    err = np.abs(q - 2.0 * delta.reshape(w.shape) - w)
    assert 0 < err.max() < np.abs(w).max() / 4


def test_qlora_finetune_trains_adapters_only_and_merges(tmp_path):
    base_dir, work, merged = str(tmp_path / "base"), str(tmp_path / "ft"), str(tmp_path / "merged")
    save_workdir(base_dir, CFG, init_weights(CFG).params)
    opts = FinetuneOptions(checkpoint=base_dir, workdir=work, rank=2, alpha=4.0, base_quant="nf4", steps=12,
                           batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2, eval_batches=2, save_every=6,
                           merge_out=merged)
    record = finetune(opts, quiet=True)
    assert record["heldout_loss_end"] < record["heldout_loss_start"] - 0.05, record
    assert json.load(open(os.path.join(work, "lora.json")))["heldout_loss_end"] == record["heldout_loss_end"]
    # params + Adam mu, nu of the adapters alone: 3 x 4 bytes per adapter param (+ Adam's counts)
    assert 12 * record["lora_params"] <= record["lora_trainable_bytes"] <= 12 * record["lora_params"] + 64
    assert record["full_trainable_bytes"] >= 12 * record["model_params"]
    cfg, base, adapters = load_finetuned(work)
    assert cfg.weight_quant == "nf4" and base["layer_0"]["attn"]["q_nf4_codes"].dtype == np.uint8
    assert all(lora.is_adapter(p[-1].key) for p, _ in jax.tree_util.tree_leaves_with_path(adapters))
    loaded = load_weights(merged)
    assert loaded.cfg.lora_rank == 0
    np.testing.assert_allclose(logits(loaded.cfg, loaded.params), logits(cfg, lora.join_params(base, adapters)),
                               atol=2e-5)
    with pytest.raises(Exception, match="holds adapters of"):
        finetune(dataclasses.replace(opts, rank=3, merge_out=""), quiet=True)


def test_peft_loads_the_export_onto_the_hf_base_with_equal_logits(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from tpustack.interop.hf import save_hf_checkpoint

    base = init_weights(CFG).params
    cfg = lora.lora_config(CFG, rank=4, alpha=8.0, targets="q,k,v,o,gate,up,down")
    adapters = random_adapters(cfg, seed=2)
    save_hf_checkpoint(str(tmp_path / "hf"), base, CFG)
    lora.export_peft(cfg, adapters, str(tmp_path / "peft"), str(tmp_path / "hf"))
    model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), torch_dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        theirs = model(torch.from_numpy(TOKENS).long()).logits.numpy()
    ours = logits(cfg, lora.join_params(base, adapters))
    assert np.abs(ours - logits(CFG, base)).max() > 0.05
    np.testing.assert_allclose(theirs, ours, atol=1e-4)


@pytest.mark.parametrize("flags,message", [
    (["--lora-rank", "0"], "--lora-rank 0: must be >= 1"),
    (["--targets", "q,lm_head"], "config.model.lora_targets: 'q,lm_head'"),
])
def test_finetune_user_errors_exit_2(flags, message, tmp_path, capsys):
    from tpustack.cli import main

    base_dir = str(tmp_path / "base")
    save_workdir(base_dir, CFG, init_weights(CFG).params)
    code = main(["finetune", "--checkpoint", base_dir, "--workdir", str(tmp_path / "ft"), "--seq-len", "32", *flags])
    assert code == 2
    assert message in capsys.readouterr().err
