"""LoRA and QLoRA: low-rank adapters on a frozen (optionally NF4) base; merge; PEFT export.

The adapters are parameters of the model itself (tpustack.model.layers.lora_delta, on when
model.lora_rank > 0): `<name>_lora_a` [K, r] and `<name>_lora_b` [r, N] beside each target
linear, y = x W + (alpha / r) (x A) B. Here the param tree is split in two: the frozen base
(float, or NF4 codes with model.weight_quant = "nf4", expanded inside the matmul) and the
adapters. Only the adapters are differentiated and only they have optimizer state, so the
trainable state is params + Adam moments of the adapters alone (`state_bytes`).

`merge_adapters` folds (alpha / r) A B into the (dequantized) base: a plain checkpoint with
no adapters. `export_peft` writes `adapter_config.json` + `adapter_model.safetensors` in
peft's layout (LoRA A as torch's [r, K], B as [N, r]), which
`peft.PeftModel.from_pretrained` loads onto the Hugging Face export of the base.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors.numpy
from flax import linen as nn

from tpustack import paths
from tpustack.model.nf4 import dequantize_nf4, nf4_shapes
from tpustack.config import Config, ModelConfig
from tpustack.errors import UserError
from tpustack.model import Decoder, abstract_params
from tpustack.train.optim import make_optimizer
from tpustack.train.precision import all_finite
from tpustack.train.step import TrainState, loss_fn

ADAPTER_SUFFIXES = ("_lora_a", "_lora_b")
# Our linear -> its Hugging Face module (the peft target name) and parent.
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def is_adapter(key: str) -> bool:
    return key.endswith(ADAPTER_SUFFIXES)


def split_params(params: dict) -> tuple[dict, dict]:
    """A LoRA model's param tree -> (frozen base, adapters), both nested like the original."""
    base, adapters = {}, {}
    for key, value in params.items():
        if isinstance(value, dict):
            b, a = split_params(value)
            if b:
                base[key] = b
            if a:
                adapters[key] = a
        else:
            (adapters if is_adapter(key) else base)[key] = value
    return base, adapters


def join_params(base: dict, adapters: dict) -> dict:
    """The inverse of split_params: one tree with the adapters beside their base weights."""
    out = dict(base)
    for key, value in adapters.items():
        out[key] = join_params(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def zero_update(adapters: dict) -> dict:
    """The adapters with every B zeroed: the base model's own function."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if path[-1].key.endswith("_lora_b") else x, adapters)


def lora_config(cfg: ModelConfig, rank: int, alpha: float, targets: str) -> ModelConfig:
    """cfg with adapters of `rank` on `targets` (comma-separated q,k,v,o,gate,up,down)."""
    return dataclasses.replace(cfg, lora_rank=rank, lora_alpha=float(alpha), lora_targets=targets,
                               scan_layers=False, remat_policy="none")


def init_adapters(cfg: ModelConfig, seed: int = 0) -> dict:
    """Fresh adapters of a LoRA config (A random, B zero). The whole init is traced but only
    the adapters are outputs, so XLA never computes the base's random weights."""
    def adapters(key):
        params = nn.meta.unbox(Decoder(cfg).init(key, jnp.zeros((1, 1), jnp.int32))["params"])
        return split_params(params)[1]
    return jax.jit(adapters)(jax.random.key(seed))


def quantize_base(cfg: ModelConfig, params: dict, base_quant: str) -> tuple[ModelConfig, dict]:
    """The frozen base as the fine-tune holds it: float ("none") or NF4 codes ("nf4")."""
    if base_quant == "none":
        return cfg, params
    from tpustack.model import quant  # the NF4 layer lives with the other weight-only formats

    if base_quant not in getattr(quant, "WEIGHT_QUANT", ()):
        raise UserError(f"--base-quant {base_quant!r}: this model has no weight_quant={base_quant!r}; use none")
    return dataclasses.replace(cfg, weight_quant=base_quant), quant.quantize_params(params, base_quant)


def init_state(config: Config, adapters: dict) -> TrainState:
    """Step 0: the adapters and their optimizer state (the base has none)."""
    from tpustack.train.precision import LossScale

    return TrainState(step=jnp.asarray(0, jnp.int32), params=adapters,
                      opt_state=make_optimizer(config.train).init(adapters), loss_scale=LossScale.create(config.train))


def lora_train_step(config: Config, state: TrainState, base: dict, batch: dict) -> tuple[TrainState, dict]:
    """One optimizer step on the adapters; the base is a frozen argument (never differentiated)."""
    scale = state.loss_scale.scale

    def loss_of(adapters):
        return loss_fn(config, join_params(base, adapters), batch, scale, batch["targets"].size)

    (_, loss), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    grads = jax.tree.map(lambda g: g / scale, grads)
    finite = all_finite(grads)
    updates, new_opt = make_optimizer(config.train).update(grads, state.opt_state, state.params)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = TrainState(step=state.step + 1, params=keep(optax.apply_updates(state.params, updates), state.params),
                           opt_state=keep(new_opt, state.opt_state), loss_scale=state.loss_scale.update(finite))
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def tree_bytes(tree: Any) -> int:
    """Bytes of every array (or ShapeDtypeStruct) in a tree."""
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def state_bytes(config: Config, adapter_state: TrainState) -> dict[str, int]:
    """Trainable state (params + optimizer state) of this fine-tune and of a full fine-tune of the
    same model in float (every weight trained by the same optimizer), from shapes only."""
    plain = dataclasses.replace(config.model, lora_rank=0, weight_quant="none")
    full = nn.meta.unbox(abstract_params(plain))
    full_opt = jax.eval_shape(make_optimizer(config.train).init, full)
    lora = tree_bytes(adapter_state.params) + tree_bytes(adapter_state.opt_state)
    return {"lora_trainable_bytes": lora, "full_trainable_bytes": tree_bytes(full) + tree_bytes(full_opt),
            "lora_params": int(sum(x.size for x in jax.tree.leaves(adapter_state.params))),
            "model_params": int(sum(math.prod(x.shape) for x in jax.tree.leaves(full)))}


def _float_weight(node: dict, name: str, shape: tuple[int, ...]) -> jax.Array:
    """A linear's weight as f32 of `shape`: the float param, or its NF4 arrays expanded."""
    if name in node:
        return jnp.asarray(node[name], jnp.float32)
    if f"{name}_nf4_codes" not in node:
        raise ValueError(f"{name}: neither a float weight nor NF4 arrays ({', '.join(node)})")
    contract = 2 if name == "o" else 1  # o is [N, H, D]: (N, H) are its input dims
    k = math.prod(shape[:contract])
    q = {part: node[f"{name}_nf4_{part}"] for part in nf4_shapes(1)}
    # model.quant stores NF4 in bitsandbytes' (torch) layout: the [N_out, K_in] weight
    return dequantize_nf4(q, (math.prod(shape) // k, k)).T.reshape(shape)


def merge_adapters(cfg: ModelConfig, params: dict) -> tuple[ModelConfig, dict]:
    """A LoRA model -> the plain float model computing the same function: W + (alpha / r) A B,
    the base dequantized where it was NF4; other leaves (norms, embedding, head) as they are."""
    plain = dataclasses.replace(cfg, lora_rank=0, weight_quant="none")
    shapes = nn.meta.unbox(abstract_params(plain))
    scale = cfg.lora_alpha / cfg.lora_rank

    def merge(node: dict, shape_node: dict) -> dict:
        out = {}
        for key, want in shape_node.items():
            if isinstance(want, dict):
                out[key] = merge(node[key], want)
            elif f"{key}_lora_a" in node:
                delta = jnp.asarray(node[f"{key}_lora_a"], jnp.float32) @ jnp.asarray(node[f"{key}_lora_b"], jnp.float32)
                out[key] = _float_weight(node, key, want.shape) + scale * delta.reshape(want.shape)
            else:
                out[key] = _float_weight(node, key, want.shape)
        return out

    return plain, jax.jit(lambda p: merge(p, shapes))(params)  # one program, not an op-by-op dispatch per leaf


def peft_state(cfg: ModelConfig, adapters: dict) -> dict[str, np.ndarray]:
    """Our adapters -> peft's safetensors dict (torch Linear layout: A [r, K], B [N, r])."""
    state = {}
    for i in range(cfg.num_layers):
        layer = adapters.get(f"layer_{i}", {})
        for block in layer.values():
            for key, value in block.items():
                name = key.removesuffix("_lora_a").removesuffix("_lora_b")
                part = "lora_A" if key.endswith("_lora_a") else "lora_B"
                hf = f"base_model.model.model.layers.{i}.{HF_MODULES[name]}.{part}.weight"
                state[hf] = np.ascontiguousarray(np.asarray(value, np.float32).T)
    return state


def peft_config(cfg: ModelConfig, base_model: str | None = None) -> dict:
    """adapter_config.json of a LoRA model (the fields peft 0.21's LoraConfig reads; others default)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "lora_dropout": 0.0, "bias": "none",
            "target_modules": sorted(HF_MODULES[t].split(".")[1] for t in cfg.lora_targets.split(",")),
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "inference_mode": True, "modules_to_save": None}


def export_peft(cfg: ModelConfig, adapters: dict, out: str, base_model: str | None = None) -> list[str]:
    """Write adapter_config.json + adapter_model.safetensors (local or gs://); return their paths."""
    paths.makedirs(out)
    config_path, weights_path = paths.join(out, "adapter_config.json"), paths.join(out, "adapter_model.safetensors")
    paths.write_text(config_path, json.dumps(peft_config(cfg, base_model), indent=2))
    paths.write_bytes(weights_path, safetensors.numpy.save(peft_state(cfg, jax.device_get(adapters)),
                                                           metadata={"format": "pt"}))
    return [config_path, weights_path]
