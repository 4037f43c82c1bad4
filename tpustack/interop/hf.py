"""Hugging Face Llama/Mistral checkpoints <-> tpustack Decoder params.

Dimension letters: D model, F mlp, N heads, K kv heads, H head dim, V vocab, L layers.
Torch Linear weights are [out, in]; ours are [in, ...out] split per head, so every tensor
maps by a transpose and a reshape. Our RoPE uses the HF rotate-half layout, so q/k need
no permutation. Arrays here are host numpy; sharding them is the caller's business.
Directories may be local or gs:// (tpustack.paths): a remote safetensors file is read into
memory whole, and written from one in-memory buffer, as safetensors opens only local files.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

# Importing ml_dtypes registers bfloat16 with numpy, which is what lets
# safetensors.numpy read and write BF16 tensors.
import ml_dtypes  # noqa: F401
import jax
import numpy as np
import safetensors.numpy
from flax import linen as nn
from flax.linen import meta

from tpustack import paths
from tpustack.config import ModelConfig
from tpustack.errors import UserError
from tpustack.model import abstract_params, stack_layers, unstack_layers

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
# Buffers some older exports carry; recomputed from rope_theta, so safe to drop.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(name)  # "bfloat16" resolves because ml_dtypes is imported


def config_from_hf(hf_config: dict, **overrides: Any) -> ModelConfig:
    """A ModelConfig from a Llama/Mistral config.json dict; overrides set other fields."""
    model_type = hf_config.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"config.json model_type={model_type!r}: only {', '.join(SUPPORTED_MODEL_TYPES)} are supported")
    for field in ("attention_bias", "mlp_bias"):
        if hf_config.get(field):
            raise UserError(f"config.json {field}=true: biases are not supported by the tpustack Decoder")
    act = hf_config.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"config.json hidden_act={act!r}: only 'silu' (SwiGLU) is supported")
    rope_theta = hf_config.get("rope_theta", 10000.0)
    # transformers >= 5 moves rope_theta into rope_parameters; older files use rope_scaling
    # for the (unsupported) scaled variants.
    for field in ("rope_parameters", "rope_scaling"):
        rope = hf_config.get(field) or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in (None, "default"):
            raise UserError(f"config.json {field}: rope type {kind!r} is not supported; only default RoPE is")
        rope_theta = rope.get("rope_theta", rope_theta)
    try:
        heads = hf_config["num_attention_heads"]
        fields = dict(
            vocab_size=hf_config["vocab_size"],
            d_model=hf_config["hidden_size"],
            num_layers=hf_config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf_config.get("num_key_value_heads") or heads,
            head_dim=hf_config.get("head_dim") or 0,
            ffn_dim=hf_config["intermediate_size"],
        )
    except KeyError as e:
        raise UserError(f"config.json: missing required field {e.args[0]!r}") from None
    max_seq_len = hf_config.get("max_position_embeddings", 2048)
    window = hf_config.get("sliding_window")
    if model_type == "mistral" and window:
        # We attend over the full causal context; capping the length at the window keeps
        # the results identical to Mistral's sliding-window attention.
        max_seq_len = min(max_seq_len, window)
    if fields["head_dim"] * heads == fields["d_model"]:
        fields["head_dim"] = 0  # our default, so an exported config loads back unchanged
    fields.update(
        rope_theta=float(rope_theta),
        norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        max_seq_len=max_seq_len,
    )
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    for key in overrides:
        if key not in known:
            raise UserError(f"config override {key!r}: not a model field; known: {', '.join(sorted(known))}")
    fields.update(overrides)
    cfg = ModelConfig(**fields)
    if cfg.num_heads % cfg.num_kv_heads:
        raise UserError(f"config.json num_key_value_heads={cfg.num_kv_heads} must divide "
                        f"num_attention_heads={cfg.num_heads}")
    return cfg


# Our leaf (path in the unrolled param tree, `{i}` for the layer) -> HF tensor name. Shapes
# and logical axes come from the model's own tree (tpustack.model.abstract_params).
_HF_NAMES = {
    ("embedding",): "model.embed_tokens.weight",
    ("layer_{i}", "attn", "q"): "model.layers.{i}.self_attn.q_proj.weight",
    ("layer_{i}", "attn", "k"): "model.layers.{i}.self_attn.k_proj.weight",
    ("layer_{i}", "attn", "v"): "model.layers.{i}.self_attn.v_proj.weight",
    ("layer_{i}", "attn", "o"): "model.layers.{i}.self_attn.o_proj.weight",
    ("layer_{i}", "mlp", "gate"): "model.layers.{i}.mlp.gate_proj.weight",
    ("layer_{i}", "mlp", "up"): "model.layers.{i}.mlp.up_proj.weight",
    ("layer_{i}", "mlp", "down"): "model.layers.{i}.mlp.down_proj.weight",
    ("layer_{i}", "attn_norm", "scale"): "model.layers.{i}.input_layernorm.weight",
    ("layer_{i}", "mlp_norm", "scale"): "model.layers.{i}.post_attention_layernorm.weight",
    ("final_norm", "scale"): "model.norm.weight",
    ("lm_head",): "lm_head.weight",
}


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One of our leaves and its HF tensor: torch Linear weights are [out, in], ours
    [*in, *out] with the heads split, so a matmul weight maps by a reshape and a transpose."""

    path: tuple[str, ...]  # in our unrolled tree
    hf_name: str
    shape: tuple[int, ...]  # ours
    contract: int  # our leading input dims of a matmul weight; 0: stored as is (embedding, norms)

    @property
    def hf_shape(self) -> tuple[int, ...]:
        if not self.contract:
            return self.shape
        return (math.prod(self.shape[self.contract:]), math.prod(self.shape[:self.contract]))

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        if not self.contract:
            return np.ascontiguousarray(x)
        # The transpose makes a view; safetensors needs contiguous buffers.
        return np.ascontiguousarray(x.reshape(self.hf_shape[::-1]).T)

    def from_hf(self, x: np.ndarray) -> np.ndarray:
        return x if not self.contract else x.T.reshape(self.shape)


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    """Every leaf of cfg's (unrolled) param tree with its HF name, derived from eval_shape of the model.

    A matmul weight's input dims are the ones before `embed` when `embed` is its output
    (o, down), else `embed` alone (q, k, v, gate, up, lm_head); the embedding is [V, D] on
    both sides."""
    boxed = abstract_params(dataclasses.replace(cfg, scan_layers=False, weight_quant="none"))
    tree, names = nn.meta.unbox(boxed), nn.get_partition_spec(boxed)
    maps = []
    for (path, leaf), (_, axes) in zip(jax.tree_util.tree_leaves_with_path(tree),
                                       jax.tree_util.tree_leaves_with_path(names, is_leaf=_is_spec)):
        keys = tuple(k.key for k in path)
        layer = keys[0].removeprefix("layer_") if keys[0].startswith("layer_") else None
        pattern = ("layer_{i}", *keys[1:]) if layer is not None else keys
        if pattern not in _HF_NAMES:
            raise ValueError(f"no Hugging Face name for parameter {'/'.join(keys)}")
        axes = tuple(axes)
        matmul = len(leaf.shape) >= 2 and keys != ("embedding",)
        contract = (len(axes) - 1 if axes[-1] == "embed" else 1) if matmul else 0
        maps.append(TensorMap(keys, _HF_NAMES[pattern].format(i=layer), tuple(leaf.shape), contract))
    return maps


def _is_spec(x: Any) -> bool:
    return isinstance(x, jax.sharding.PartitionSpec)


def params_from_hf_state(state: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
    """HF tensor dict -> our param tree (numpy, cfg.param_dtype, scanned if cfg.scan_layers)."""
    dtype = _np_dtype(cfg.param_dtype)
    used = set()
    params: dict[str, Any] = {}
    for m in tensor_maps(cfg):
        if m.hf_name not in state:
            raise UserError(f"checkpoint: tensor {m.hf_name} is missing (expected shape {list(m.hf_shape)})")
        value = np.asarray(state[m.hf_name])
        if value.shape != m.hf_shape:
            raise UserError(f"checkpoint: tensor {m.hf_name} has shape {list(value.shape)}, expected "
                            f"{list(m.hf_shape)} from config.json")
        used.add(m.hf_name)
        node = params
        for key in m.path[:-1]:
            node = node.setdefault(key, {})
        node[m.path[-1]] = np.ascontiguousarray(m.from_hf(value), dtype=dtype)
    if cfg.tie_embeddings:
        used.add("lm_head.weight")  # a tied export may still carry the shared copy
    # Leftover tensors mean the checkpoint has something the Decoder would silently drop.
    extra = sorted(n for n in state if n not in used and not n.endswith(_IGNORED_SUFFIXES))
    if extra:
        shown = ", ".join(extra[:3]) + (f" (+{len(extra) - 3} more)" if len(extra) > 3 else "")
        raise UserError(f"checkpoint: unexpected tensors {shown}; this architecture is not supported")
    return stack_layers(params, cfg) if cfg.scan_layers else params


def params_to_hf_state(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our param tree (boxed or not, scanned or not, any arrays) -> HF tensor dict in the params' dtype."""
    params = unstack_layers(meta.unbox(params), cfg)
    state = {}
    for m in tensor_maps(cfg):
        node = params
        for key in m.path:
            node = node[key]
        state[m.hf_name] = m.to_hf(np.asarray(node))
    return state


def load_hf_checkpoint(path: str, **config_overrides: Any) -> tuple[ModelConfig, dict]:
    """Read config.json and all *.safetensors under `path`; return (cfg, numpy params)."""
    if not paths.isdir(path):
        raise UserError(f"HF checkpoint {path!r}: no such directory; pass a directory holding config.json")
    config_path = paths.join(path, "config.json")
    if not paths.isfile(config_path):
        raise UserError(f"HF checkpoint {path!r}: config.json is missing")
    cfg = config_from_hf(json.loads(paths.read_text(config_path)), **config_overrides)
    # A sharded checkpoint's index only maps names to files; reading every shard is enough.
    files = paths.glob(paths.join(path, "*.safetensors"))
    if not files:
        raise UserError(f"HF checkpoint {path!r}: no *.safetensors files; convert .bin weights "
                        "with transformers' save_pretrained(safe_serialization=True)")
    state: dict[str, np.ndarray] = {}
    for file in files:
        if paths.is_remote(file):
            state.update(safetensors.numpy.load(paths.read_bytes(file)))
        else:
            state.update(safetensors.numpy.load_file(file))
    return cfg, params_from_hf_state(state, cfg)


def hf_config_from(cfg: ModelConfig) -> dict[str, Any]:
    """A LlamaForCausalLM config.json dict describing cfg."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.heads_dim,
        "intermediate_size": cfg.ffn_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        # Both spellings: transformers < 5 reads rope_theta, >= 5 reads rope_parameters.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_seq_len,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": cfg.param_dtype,
    }


def save_hf_checkpoint(path: str, params: dict, cfg: ModelConfig, bos_id: int | None = None,
                       eos_id: int | None = None) -> None:
    """Write config.json and model.safetensors that transformers' from_pretrained loads, and
    generation_config.json when the token ids are known."""
    paths.makedirs(path)
    config = hf_config_from(cfg)
    if bos_id is not None or eos_id is not None:
        ids = {"bos_token_id": bos_id, "eos_token_id": eos_id}
        config.update(ids)
        # transformers' generate reads these: stop at EOS, at most the trained context.
        generation = {**ids, "pad_token_id": eos_id, "max_length": cfg.max_seq_len}
        paths.write_text(paths.join(path, "generation_config.json"), json.dumps(generation, indent=2))
    paths.write_text(paths.join(path, "config.json"), json.dumps(config, indent=2))
    state, file = params_to_hf_state(params, cfg), paths.join(path, "model.safetensors")
    # transformers refuses safetensors files whose metadata lacks a known format.
    if paths.is_remote(file):
        paths.write_bytes(file, safetensors.numpy.save(state, metadata={"format": "pt"}))
    else:
        safetensors.numpy.save_file(state, file, metadata={"format": "pt"})
