"""tpustack params <-> GGUF files (llama.cpp's format), written and read by the `gguf` package.

The path runs through the Hugging Face layout (tpustack.interop.hf: [out, in] matrices with
HF names), which is where llama.cpp's own converter (convert_hf_to_gguf.py) starts, and does
what it does for a LlamaForCausalLM: tensor names from gguf's TensorNameMap
(model.layers.0.self_attn.q_proj.weight -> blk.0.attn_q.weight), and q/k rows permuted from
HF's rotate-half RoPE layout into the interleaved pairs of llama.cpp's "llama" RoPE.

Types (--type): f32 and f16 store every matrix so; q8_0 and q4_0 quantize every matrix
(embedding and output included, as `llama-quantize --pure` would) with gguf.quants.quantize,
falling back to f16 for a matrix whose rows are not whole blocks (as the converter does);
1-D tensors (norms) stay f32. q4_k: gguf.quants has no Q4_K quantizer, so the file is
written in f32 and llama.cpp's own quantizer (llama_model_quantize from llama-cpp-python,
pure Q4_K, with llama.cpp's fallbacks for rows that are not whole 256-blocks) converts it.

A weight-only quantized checkpoint (model.weight_quant int8 | int4 | nf4) is dequantized and
written as --type, by default its nearest GGUF type (NEAREST_TYPE says what that loses).

Reading dequantizes whatever gguf.quants can (F32, F16, BF16, Q8_0, Q4_0, Q4_K, ...) to f32.
Dimension letters: D model, F mlp, N heads, K kv heads, H head dim, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from typing import Any

import gguf
import jax
import numpy as np
from flax import linen as nn

from tpustack import paths
from tpustack.model.nf4 import dequantize_nf4, nf4_shapes
from tpustack.model.grouped import dequantize_grouped, unpack_codes
from tpustack.config import ModelConfig
from tpustack.errors import UserError
from tpustack.interop.gguf_vocab import add_vocab, field_value, read_vocab
from tpustack.interop.hf import params_from_hf_state, params_to_hf_state, tensor_maps
from tpustack.kernels.reference import dequantize_int4
from tpustack.model import abstract_params

ARCH = "llama"
TENSOR_TYPES = {
    "f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "q4_k": gguf.GGMLQuantizationType.Q4_K,
}
# A quantized checkpoint's nearest GGUF type. Not lossless: the dequantized weights are
# quantized again on GGUF's own blocks (32 values, one f16 scale each). Measured on random
# 256-wide weights (relative rms error added, beside the checkpoint's own from float):
# int8 -> Q8_0 0.5% (own 0.6%); int4 -> Q4_0 8.2% (own 10.4%); nf4 -> Q4_0 9.1% (own 8.2%):
# 16 levels a group of 128 (int4) or normal-float levels a block of 64 (nf4) do not land on
# Q4_0's 16 even levels a block of 32, so a 4-bit checkpoint loses about as much again.
# --type q8_0 keeps a 4-bit checkpoint within 0.5% at twice the size.
NEAREST_TYPE = {"int8": "q8_0", "int4": "q4_0", "nf4": "q4_0", "int4_zp": "q4_0"}  # int4_zp: 3/4-bit RTN/GPTQ/AWQ
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
              "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_S}


def gguf_names(cfg: ModelConfig) -> dict[str, str]:
    """HF tensor name -> GGUF tensor name, by the converter's own table (gguf.TensorNameMap)."""
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_layers)
    out = {}
    for m in tensor_maps(cfg):
        name = table.get_name(m.hf_name, try_suffixes=(".weight",))
        if name is None:
            raise ValueError(f"no GGUF name for {m.hf_name}")
        out[m.hf_name] = name
    return out


def permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """HF rotate-half q/k rows -> llama.cpp's interleaved pairs (convert_hf_to_gguf.py's permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of permute_rows: interleaved pairs -> rotate-half."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_heads(hf_name: str, cfg: ModelConfig) -> int:
    """Heads whose rows permute_rows regroups: N for q, K for k, 0 for other tensors."""
    if hf_name.endswith("q_proj.weight"):
        return cfg.num_heads
    return cfg.num_kv_heads if hf_name.endswith("k_proj.weight") else 0


def encode_tensor(w: np.ndarray, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """(data for GGUFWriter.add_tensor, its type): 1-D stays f32; rows not whole blocks fall back to f16."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return w, gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.F16:
        return w.astype(np.float16), qtype
    try:
        return gguf.quants.quantize(w, qtype), qtype
    except gguf.quants.QuantError:  # row length not a multiple of the block
        return w.astype(np.float16), gguf.GGMLQuantizationType.F16


def _add_config(writer: gguf.GGUFWriter, cfg: ModelConfig, name: str, tensor_type: str) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[tensor_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_key_length(cfg.heads_dim)
    writer.add_value_length(cfg.heads_dim)
    writer.add_rope_dimension_count(cfg.heads_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)


def write_local(path: str, params: dict, cfg: ModelConfig, tokenizer: Any, tensor_type: str = "f32",
                name: str = "tpustack", chat_template: str | None = None) -> None:
    """Write a GGUF file at the local `path` (f32, f16, q8_0 or q4_0; q4_k goes through write_gguf)."""
    qtype = TENSOR_TYPES[tensor_type]
    writer = gguf.GGUFWriter(path, ARCH)
    _add_config(writer, cfg, name, tensor_type)
    if tokenizer is not None:
        add_vocab(writer, tokenizer, cfg.vocab_size)
    if chat_template:
        writer.add_chat_template(chat_template)
    names = gguf_names(cfg)
    for hf_name, w in params_to_hf_state(params, cfg).items():
        heads = _rope_heads(hf_name, cfg)
        data, dtype = encode_tensor(permute_rows(w, heads) if heads else w, qtype)
        writer.add_tensor(names[hf_name], data, raw_dtype=dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize_q4_k(src: str, dst: str) -> None:
    """llama.cpp's own quantizer: every matrix of the GGUF `src` to Q4_K (its fallbacks aside) in `dst`."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError("--type q4_k: needs llama.cpp's quantizer; pip install 'tpustack[llama]'") from None
    qp = llama_cpp.llama_model_quantize_default_params()
    qp.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_S
    qp.pure = True  # Q4_K throughout, not the Q4_K_S mix of Q5_K/Q6_K for some tensors
    qp.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), qp) != 0:
        raise RuntimeError(f"llama_model_quantize {src} -> {dst} failed")


def dequantized(params: dict, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
    """A weight-only quantized tree (model.weight_quant int8 | int4 | nf4 | int4_zp; unrolled) -> its f32 weights."""
    mode = cfg.weight_quant
    if mode not in NEAREST_TYPE:
        raise UserError(f"model.weight_quant={mode!r}: GGUF export reads {', '.join(NEAREST_TYPE)} checkpoints")
    float_cfg = dataclasses.replace(cfg, weight_quant="none", scan_layers=False)
    shapes = jax.tree.map(lambda x: x.shape, nn.meta.unbox(abstract_params(float_cfg)))
    params = jax.device_get(params)

    def convert(shape_tree: dict, tree: dict) -> dict:
        out = {}
        for key, shape in shape_tree.items():
            if isinstance(shape, dict):
                out[key] = convert(shape, tree[key])
            elif key in tree:  # embedding, norms: float as they were
                out[key] = np.asarray(tree[key], np.float32)
            else:
                k = math.prod(shape[:2 if key == "o" else 1])  # o is [N, H, D]: (N, H) are the input dims
                out[key] = np.asarray(_dequantize_KN(tree, key, mode, k, math.prod(shape) // k)).reshape(shape)
        return out

    return convert(shapes, params), float_cfg


def _dequantize_KN(tree: dict, key: str, mode: str, k: int, n: int) -> Any:
    """The f32 [K, N] matrix behind one linear's quantized params (layout: tpustack.model.quant)."""
    if mode == "int8":
        return tree[f"{key}_int8"].astype(np.float32) * tree[f"{key}_scale"][None, :]
    if mode == "int4":
        return dequantize_int4(tree[f"{key}_int4"], tree[f"{key}_scale"])
    if mode == "int4_zp":
        return dequantize_grouped({"q": unpack_codes(np.asarray(tree[f"{key}_codes"])), "scale": tree[f"{key}_scale"],
                                   "zero": tree[f"{key}_zero"]})
    return dequantize_nf4({part: tree[f"{key}_nf4_{part}"] for part in nf4_shapes(k * n)}, (n, k)).T


def write_gguf(path: str, params: dict, cfg: ModelConfig, tokenizer: Any, tensor_type: str | None = "f32",
               name: str = "tpustack", chat_template: str | None = None) -> None:
    """Write params (our tree), cfg and tokenizer as a GGUF file at `path` (local or gs://).

    A weight-only quantized checkpoint is dequantized and written as `tensor_type`, by default
    the nearest GGUF type (NEAREST_TYPE)."""
    if cfg.weight_quant != "none":
        tensor_type = tensor_type or NEAREST_TYPE.get(cfg.weight_quant)
        params, cfg = dequantized(params, cfg)
    tensor_type = tensor_type or "f32"
    if tensor_type not in TENSOR_TYPES:
        raise UserError(f"--type {tensor_type!r}: one of {', '.join(TENSOR_TYPES)}")
    with tempfile.TemporaryDirectory(prefix="tpustack-gguf-") as tmp:
        local = os.path.join(tmp, "model.gguf") if paths.is_remote(path) else path
        if tensor_type == "q4_k":
            f32 = os.path.join(tmp, "f32.gguf")
            write_local(f32, params, cfg, tokenizer, "f32", name, chat_template)
            quantize_q4_k(f32, local)
        else:
            write_local(local, params, cfg, tokenizer, tensor_type, name, chat_template)
        if local != path:
            with open(local, "rb") as f:
                paths.write_bytes(path, f.read())


def config_from_gguf(reader: gguf.GGUFReader, vocab_size: int) -> ModelConfig:
    """A ModelConfig from the llama.* keys of a GGUF file."""
    arch = field_value(reader, "general.architecture")
    if arch != ARCH:
        raise UserError(f"GGUF general.architecture {arch!r}: only {ARCH!r} is supported")
    if field_value(reader, f"{ARCH}.rope.scaling.type", "none") not in ("none", None):
        raise UserError("GGUF llama.rope.scaling.type: scaled RoPE is not supported; only default RoPE is")

    def key(k: str, default: Any = None) -> Any:
        value = field_value(reader, f"{ARCH}.{k}", default)
        if value is None:
            raise UserError(f"GGUF metadata: {ARCH}.{k} is missing")
        # GGUF floats are f32: the shortest decimal that rounds to it gives back 1e-05, not 9.99e-06
        return float(str(np.float32(value))) if isinstance(value, float) else value

    heads, d = int(key("attention.head_count")), int(key("embedding_length"))
    head_dim = int(key("attention.key_length", key("rope.dimension_count", d // heads)))
    if int(key("rope.dimension_count", head_dim)) != head_dim:
        raise UserError("GGUF llama.rope.dimension_count: partial RoPE is not supported")
    return ModelConfig(
        vocab_size=vocab_size, d_model=d, num_layers=int(key("block_count")), num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)), head_dim=0 if head_dim * heads == d else head_dim,
        ffn_dim=int(key("feed_forward_length")), rope_theta=float(key("rope.freq_base", 10000.0)),
        norm_eps=float(key("attention.layer_norm_rms_epsilon")), max_seq_len=int(key("context_length")),
        tie_embeddings="output.weight" not in {t.name for t in reader.tensors})


def tensor_f32(t: Any) -> np.ndarray:
    """A ReaderTensor's values as f32 in numpy (row-major, HF) order, dequantized."""
    shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dims fastest first
    try:
        # A copy: the reader's arrays map the file, which may be a temporary download.
        return np.array(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
    except NotImplementedError:
        raise UserError(f"GGUF tensor {t.name}: type {t.tensor_type.name} cannot be dequantized here") from None


def _reader(local: str, path: str) -> gguf.GGUFReader:
    """The reader of a local GGUF file (`path`: the name the user gave, for the error)."""
    try:
        return gguf.GGUFReader(local)
    except (ValueError, OSError) as e:
        raise UserError(f"--checkpoint {path!r}: not a readable GGUF file ({e})") from None


def read_local(path: str) -> tuple[ModelConfig, dict, Any, str | None]:
    """(cfg, numpy params, tokenizer or None, chat template or None) of a local GGUF file."""
    reader = _reader(path, path)
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise UserError(f"--checkpoint {path!r}: no token_embd.weight; not a llama GGUF model")
    cfg = config_from_gguf(reader, int(tensors["token_embd.weight"].shape[1]))
    names = gguf_names(cfg)
    missing = [g for g in names.values() if g not in tensors and g != "output.weight"]
    if missing:
        raise UserError(f"GGUF {path!r}: tensors missing: {', '.join(missing[:3])}")
    extra = sorted(set(tensors) - set(names.values()) - {"rope_freqs.weight"})
    if extra:
        raise UserError(f"GGUF {path!r}: unexpected tensors {', '.join(extra[:3])}; this architecture is not supported")
    state = {}
    for hf_name, name in names.items():
        if name in tensors:
            heads = _rope_heads(hf_name, cfg)
            w = tensor_f32(tensors[name])
            state[hf_name] = unpermute_rows(w, heads) if heads else w
    return cfg, params_from_hf_state(state, cfg), read_vocab(reader), field_value(reader, "tokenizer.chat_template")


def read_chat_template(path: str) -> tuple[str | None, str, str]:
    """(chat template or None, bos token text, eos token text) from a GGUF file's metadata, as
    tpustack.data.chat.load_chat_template gives them for a Hugging Face directory. Reads only
    the header of a local file (the reader maps it; no tensor is touched); a gs:// file is
    copied down first."""
    with paths.local_copy(path) as local:
        reader = _reader(local, path)
        tokens = field_value(reader, "tokenizer.ggml.tokens", [])
        text = lambda key: (tokens[i] if (i := field_value(reader, key)) is not None  # noqa: E731
                            and 0 <= i < len(tokens) else "")
        return field_value(reader, "tokenizer.chat_template"), text("tokenizer.ggml.bos_token_id"), \
            text("tokenizer.ggml.eos_token_id")


def read_gguf(path: str) -> tuple[ModelConfig, dict, Any, str | None]:
    """(cfg, numpy f32 params, tokenizer, chat template) of a GGUF file, local or gs://."""
    if not paths.isfile(path):
        raise UserError(f"--checkpoint {path!r}: no such GGUF file")
    with paths.local_copy(path) as local:
        return read_local(local)
