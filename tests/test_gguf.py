"""GGUF export and import (tpustack.interop.gguf) without llama.cpp: quantized bytes equal
gguf.quants', the metadata llama.cpp reads, the RoPE row permutation, round trips through
load_weights, tokenizers back from the metadata, and `tpustack export --format gguf`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from text_samples import sample_strings
from tpustack.config import ModelConfig
from tpustack.data import ByteTokenizer, HFTokenizer
from tpustack.data.chat import DEFAULT_CHAT_TEMPLATE
from tpustack.interop.gguf import gguf_names, permute_rows, read_gguf, unpermute_rows, write_gguf
from tpustack.interop.gguf_vocab import LLAMA3_REGEX
from tpustack.interop.hf import params_to_hf_state, save_hf_checkpoint
from tpustack.weights import init_weights, load_weights

ROOT = Path(__file__).resolve().parents[1]
CFG = ModelConfig(vocab_size=384, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=128,
                  max_seq_len=64, norm_eps=1e-5, rope_theta=5e5)


def _noisy(cfg: ModelConfig = CFG, seed: int = 0) -> dict:
    """Random params, norms included, so a swapped or mis-permuted tensor shows."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: ((1.0 if "scale" in str(path[-1]) else 0.0)
                         + 0.1 * rng.standard_normal(x.shape)).astype(np.float32),
        jax.device_get(init_weights(cfg).params))


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_quantized_bytes_equal_gguf_quants_and_read_back_dequantized(tmp_path, kind):
    params, qtype = _noisy(), gguf.GGMLQuantizationType[kind.upper()]
    path = str(tmp_path / f"m.{kind}.gguf")
    write_gguf(path, params, CFG, ByteTokenizer(), kind)
    reader, names = gguf.GGUFReader(path), gguf_names(CFG)
    tensors = {t.name: t for t in reader.tensors}
    heads = {"q_proj": CFG.num_heads, "k_proj": CFG.num_kv_heads}
    want_state = {}
    for hf_name, w in params_to_hf_state(params, CFG).items():
        t = tensors[names[hf_name]]
        n = next((h for k, h in heads.items() if k in hf_name), 0)
        if w.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(t.data, w)
            want_state[hf_name] = w
            continue
        ref = gguf.quants.quantize(permute_rows(w, n) if n else w, qtype)
        assert t.tensor_type == qtype and tuple(int(d) for d in t.shape) == w.shape[::-1]
        assert t.data.tobytes() == ref.tobytes(), hf_name  # byte for byte the package's quantizer
        deq = gguf.quants.dequantize(ref, qtype)
        want_state[hf_name] = unpermute_rows(deq, n) if n else deq
    cfg, back, tok, _ = read_gguf(path)
    assert cfg == CFG and isinstance(tok, ByteTokenizer)
    got_state = params_to_hf_state(back, cfg)
    assert set(got_state) == set(want_state)
    for name, want in want_state.items():
        np.testing.assert_array_equal(got_state[name], want)
    err = max(float(np.abs(got_state[k] - w).max() / np.abs(w).max())
              for k, w in params_to_hf_state(params, CFG).items())
    assert 0 < err < (0.01 if kind == "q8_0" else 0.2)  # quantized, but near


def test_metadata_keys_and_tensor_names_are_llama_cpps(tmp_path):
    path = str(tmp_path / "m.gguf")
    write_gguf(path, _noisy(), CFG, ByteTokenizer(), "f16", name="tiny", chat_template="{{ messages }}")
    reader = gguf.GGUFReader(path)
    want = {"general.architecture": "llama", "general.name": "tiny", "general.file_type": 1,
            "llama.context_length": 64, "llama.embedding_length": 64, "llama.block_count": 2,
            "llama.feed_forward_length": 128, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
            "llama.rope.dimension_count": 16, "llama.rope.freq_base": 5e5, "llama.vocab_size": 384,
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.bos_token_id": 256,
            "tokenizer.ggml.eos_token_id": 257, "tokenizer.ggml.add_bos_token": False,
            "tokenizer.chat_template": "{{ messages }}"}
    assert {k: _field(reader, k) for k in want} == want
    assert np.isclose(_field(reader, "llama.attention.layer_norm_rms_epsilon"), 1e-5)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == 384 and tokens[ord("a")] == "a" and tokens[ord(" ")] == "Ġ" and tokens[256:258] == ["<s>", "</s>"]
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    assert {t.name for t in reader.tensors} == {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in per_layer}
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"


def _rope(x_TH: np.ndarray, interleaved: bool, theta: float = 1e4) -> np.ndarray:
    """RoPE on [T, H]: rotate-half pairs (i, i + H/2) (HF, ours) or interleaved (2i, 2i+1) (llama.cpp's)."""
    t, h = x_TH.shape
    ang = np.arange(t)[:, None] * theta ** (-np.arange(0, h, 2) / h)[None, :]
    cos, sin = np.cos(ang), np.sin(ang)
    a, b = (x_TH[:, 0::2], x_TH[:, 1::2]) if interleaved else (x_TH[:, :h // 2], x_TH[:, h // 2:])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    if interleaved:
        return np.stack([ra, rb], -1).reshape(t, h)
    return np.concatenate([ra, rb], -1)


def test_permuted_rows_under_interleaved_rope_give_rotate_half_attention_scores():
    """The reason for the permutation: llama.cpp's RoPE on permuted q/k rows scores like ours."""
    rng = np.random.default_rng(1)
    heads, h, d, t = 3, 8, 12, 5
    x_TD = rng.standard_normal((t, d))
    wq, wk = rng.standard_normal((heads * h, d)), rng.standard_normal((heads * h, d))
    def scores(pq: np.ndarray, pk: np.ndarray, interleaved: bool) -> np.ndarray:
        q, k = (x_TD @ pq.T).reshape(t, heads, h), (x_TD @ pk.T).reshape(t, heads, h)
        return np.stack([_rope(q[:, n], interleaved) @ _rope(k[:, n], interleaved).T for n in range(heads)])

    want = scores(wq, wk, interleaved=False)
    np.testing.assert_allclose(scores(permute_rows(wq, heads), permute_rows(wk, heads), True), want, rtol=1e-9, atol=1e-9)
    assert not np.allclose(scores(wq, wk, True), want)  # without the permutation they differ
    np.testing.assert_array_equal(unpermute_rows(permute_rows(wq, heads), heads), wq)
    assert not np.array_equal(permute_rows(wq, heads), wq)


def test_f32_round_trip_import_export_import_is_lossless(tmp_path):
    tied = ModelConfig(**{**CFG.__dict__, "tie_embeddings": True, "head_dim": 32, "max_seq_len": 96})
    for cfg in (CFG, tied):
        params = _noisy(cfg)
        first, second = str(tmp_path / "a.gguf"), str(tmp_path / "b.gguf")
        write_gguf(first, params, cfg, ByteTokenizer(), "f32")
        loaded = load_weights(first)
        assert loaded.cfg == cfg and isinstance(loaded.tokenizer, ByteTokenizer)
        write_gguf(second, jax.device_get(loaded.params), loaded.cfg, loaded.tokenizer, "f32")
        again = load_weights(second)
        assert again.cfg == cfg and Path(first).read_bytes() == Path(second).read_bytes()
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(jax.device_get(again.params)), strict=True):
            np.testing.assert_array_equal(a, b)
        assert ("output.weight" in {t.name for t in gguf.GGUFReader(first).tensors}) != cfg.tie_embeddings
        Path(first).unlink()
        Path(second).unlink()


def _bpe_tokenizer_file(tmp_path, pre: str) -> str:
    """A byte-level BPE trained here on the test strings, with GPT-2's or Llama 3's pre-tokenizer."""
    tok = Tokenizer(models.BPE())
    if pre == "gpt-2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sample_strings(400, seed=7) * 3, trainer)
    path = str(tmp_path / f"{pre}.tokenizer.json")
    tok.save(path)
    return path


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe"])
def test_hf_bpe_tokenizer_goes_in_and_comes_back_encoding_alike(tmp_path, pre):
    source = HFTokenizer(_bpe_tokenizer_file(tmp_path, pre))
    cfg = ModelConfig(**{**CFG.__dict__, "vocab_size": 640})
    path = str(tmp_path / "bpe.gguf")
    write_gguf(path, _noisy(cfg), cfg, source, "q8_0")
    reader = gguf.GGUFReader(path)
    assert _field(reader, "tokenizer.ggml.pre") == pre and len(_field(reader, "tokenizer.ggml.merges")) > 100
    _, _, back, _ = read_gguf(path)
    assert isinstance(back, HFTokenizer) and (back.bos_id, back.eos_id) == (source.bos_id, source.eos_id)
    for text in sample_strings(1000, seed=3):
        ids = source.encode(text).tolist()
        assert back.encode(text).tolist() == ids, text
        assert back.decode(ids) == source.decode(ids), text


def test_the_byte_tokenizers_tokenizer_json_exports_as_the_byte_vocab(tmp_path):
    import json

    from tpustack.interop.tokenizer_json import byte_tokenizer_json

    (tmp_path / "tokenizer.json").write_text(json.dumps(byte_tokenizer_json()))
    path = str(tmp_path / "m.gguf")
    write_gguf(path, _noisy(), CFG, HFTokenizer(str(tmp_path / "tokenizer.json")), "f32")
    assert isinstance(read_gguf(path)[2], ByteTokenizer)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tpustack", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_cli_export_gguf_writes_a_file_load_weights_reads_and_refuses_bad_input(tmp_path):
    import json

    from tpustack.interop.tokenizer_json import byte_tokenizer_json

    hf = tmp_path / "hf"
    params = _noisy()
    save_hf_checkpoint(str(hf), params, CFG)
    (hf / "tokenizer.json").write_text(json.dumps(byte_tokenizer_json()))
    out = tmp_path / "m.gguf"
    done = _cli("export", "--checkpoint", str(hf), "--format", "gguf", "--type", "q8_0", "--out", str(out))
    assert done.returncode == 0, done.stderr
    loaded = load_weights(str(out))
    assert loaded.cfg == CFG and isinstance(loaded.tokenizer, ByteTokenizer)
    reader = gguf.GGUFReader(str(out))
    assert {t.tensor_type.name for t in reader.tensors} == {"Q8_0", "F32"}
    assert _field(reader, "tokenizer.chat_template") == DEFAULT_CHAT_TEMPLATE  # as the hf export carries
    bad = _cli("export", "--checkpoint", str(hf), "--format", "gguf", "--type", "q3_x", "--out", str(tmp_path / "b.gguf"))
    assert bad.returncode == 2 and "q3_x" in bad.stderr and "q4_k" in bad.stderr and "Traceback" not in bad.stderr
    from tpustack.errors import UserError
    from tpustack.export import export

    with pytest.raises(UserError, match="exists"):
        export(str(hf), "gguf", str(out))
    with pytest.raises(UserError, match="none.gguf"):
        export(str(tmp_path / "none.gguf"), "gguf", str(tmp_path / "c.gguf"))


def test_a_gguf_of_another_architecture_is_refused(tmp_path):
    from tpustack.errors import UserError

    path = str(tmp_path / "other.gguf")
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="architecture 'gpt2'"):
        load_weights(path)


def test_gguf_export_and_import_on_gs(gcs_bucket, tmp_path):
    """write_gguf to gs:// (written locally, uploaded) and load_weights of the gs:// file (downloaded)."""
    params, url = _noisy(), f"{gcs_bucket}/models/m.q4_0.gguf"
    write_gguf(url, params, CFG, ByteTokenizer(), "q4_0")
    write_gguf(str(tmp_path / "m.gguf"), params, CFG, ByteTokenizer(), "q4_0")
    from tpustack import paths

    assert paths.read_bytes(url) == (tmp_path / "m.gguf").read_bytes()
    remote, local = load_weights(url), load_weights(str(tmp_path / "m.gguf"))
    assert remote.cfg == local.cfg == CFG and isinstance(remote.tokenizer, ByteTokenizer)
    for a, b in zip(jax.tree.leaves(remote.params), jax.tree.leaves(local.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("mode,nearest,bound", [("int8", "Q8_0", 0.005), ("int4", "Q4_0", 0.15), ("nf4", "Q4_0", 0.15)])
def test_a_quantized_checkpoint_exports_to_its_nearest_type(tmp_path, mode, nearest, bound):
    """Dequantized, then quantized on GGUF's blocks: the file holds gguf.quants' blocks of the
    checkpoint's own weights, off from them by the requantization alone (bound: relative, per tensor)."""
    import dataclasses

    from tpustack.model.quant import quantize_params

    cfg = dataclasses.replace(CFG, d_model=256, ffn_dim=256, num_layers=1)  # int4: K % 256 == 0
    qcfg, qparams = dataclasses.replace(cfg, weight_quant=mode), quantize_params(_noisy(cfg), mode)
    from tpustack.interop.gguf import dequantized

    want, float_cfg = dequantized(qparams, qcfg)
    assert float_cfg == cfg
    path = str(tmp_path / "q.gguf")
    write_gguf(path, qparams, qcfg, ByteTokenizer(), None)
    assert {t.tensor_type.name for t in gguf.GGUFReader(path).tensors} == {nearest, "F32"}
    got_cfg, got, _, _ = read_gguf(path)
    assert got_cfg == cfg
    qtype = gguf.GGMLQuantizationType[nearest]
    for (name, w), g in zip(params_to_hf_state(want, cfg).items(), params_to_hf_state(got, cfg).values(), strict=True):
        if w.ndim == 2:
            heads = cfg.num_heads if "q_proj" in name else cfg.num_kv_heads if "k_proj" in name else 0
            p = permute_rows(w, heads) if heads else w
            ref = gguf.quants.dequantize(gguf.quants.quantize(p, qtype), qtype)
            np.testing.assert_array_equal(g, unpermute_rows(ref, heads) if heads else ref)
        assert np.abs(g - w).max() <= bound * np.abs(w).max(), name


def test_serve_reads_a_gguf_files_chat_template_and_special_tokens(tmp_path):
    """`tpustack serve --checkpoint x.gguf` renders chat with the file's own template (as llama.cpp
    does), not the server's default; bos/eos texts come from the file's vocabulary."""
    from tpustack.weights import chat_template_of

    path = str(tmp_path / "t.gguf")
    write_gguf(path, _noisy(), CFG, ByteTokenizer(), "f32", name="tiny", chat_template="{{ bos_token }}{{ messages }}")
    template, bos, eos = chat_template_of(path)
    assert template == "{{ bos_token }}{{ messages }}"
    tokens = _field(gguf.GGUFReader(path), "tokenizer.ggml.tokens")
    assert (bos, eos) == (tokens[_field(gguf.GGUFReader(path), "tokenizer.ggml.bos_token_id")],
                          tokens[_field(gguf.GGUFReader(path), "tokenizer.ggml.eos_token_id")])
    assert bos and eos and bos != eos
