"""Layers of a Llama decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

Dimension letters: B batch, T query length, S key length, D model, F mlp, N heads,
K kv heads, G query heads per kv head (N = K * G), H head dim, V vocab.
Parameters are stored in `param_dtype` (the fp32 master copy when training) and cast to
the compute `dtype` where they are used, so gradients land in the master dtype.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from tpustack.config import ModelConfig
from tpustack.kernels import (compat, decode_attention, flash_attention, matmul, pack_weight, packed_matmul,
                              paged_attention, paged_attention_impl)
from tpustack.model.fp8 import COLLECTION as FP8_COLLECTION
from tpustack.model.fp8 import fp8_dense
from tpustack.model.quant import quantized_dense
from tpustack.remat import checkpoint_tag


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def param(module: nn.Module, name: str, shape: tuple[int, ...], names: tuple[str, ...],
          cfg: ModelConfig, std: float | None = None, ones: bool = False) -> jax.Array:
    """Create a parameter carrying its logical axis names; return it in the compute dtype."""
    init = nn.initializers.ones if ones else nn.initializers.normal(cfg.init_std if std is None else std)
    value = module.param(name, nn.with_logical_partitioning(init, names), shape,
                         dtype_of(cfg.param_dtype))
    return value.astype(dtype_of(cfg.dtype))


class RMSNorm(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        scale_D = param(self, "scale", (x_BTD.shape[-1],), ("norm",), self.cfg, ones=True)
        x32 = x_BTD.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
        # Hugging Face multiplies in the input dtype after normalising in f32.
        return x32.astype(x_BTD.dtype) * scale_D


def dense(x: jax.Array, w: jax.Array, contract: int = 1, impl: str = "xla") -> jax.Array:
    """x [..., *in] @ w [*in, *out] (in = w's first `contract` dims) as one 2-D matmul.

    Same math as the einsum, but XLA CPU lowers the weight gradient of a 3-D einsum such as
    "btd,df->btf" with a transposed copy of the [B*T, F] cotangent, an element-strided loop
    that took longer than the matmul itself; a 2-D dot's gradients are plain dots.
    `impl` is tpustack.kernels.matmul's: "auto" (model.decode_kernels when decoding) may take
    the native CPU kernel, "xla" never does.
    """
    in_shape, out_shape = w.shape[:contract], w.shape[contract:]
    lead = x.shape[: x.ndim - contract]
    assert x.shape[x.ndim - contract:] == in_shape, (x.shape, w.shape)
    y = matmul(x.reshape(math.prod(lead), math.prod(in_shape)),
               w.reshape(math.prod(in_shape), math.prod(out_shape)), impl=impl)
    return y.reshape(*lead, *out_shape)


# Dense weights packed for the native CPU matmul (tpustack.model.transformer.pack_for_cpu): a
# linear with a weight here uses it and never reads its param.
PACKED_COLLECTION = "cpu_packed"


def linear(module: nn.Module, name: str, x: jax.Array, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
           names: tuple[str, ...], cfg: ModelConfig, std: float | None = None) -> jax.Array:
    """x [..., *in] @ W[*in, *out]: a float parameter, or weight-only int8/int4 (model.weight_quant),
    plus a LoRA update when model.lora_rank > 0 and `name` is one of model.lora_targets."""
    flat_names = (names[0], names[len(in_shape)])  # [K, N]: the leading name of each side
    k, n = math.prod(in_shape), math.prod(out_shape)
    if cfg.weight_quant == "none" and module.has_variable(PACKED_COLLECTION, name):
        lead = x.shape[: x.ndim - len(in_shape)]
        y = packed_matmul(x.reshape(-1, k), module.get_variable(PACKED_COLLECTION, name), n).reshape(*lead, *out_shape)
    elif cfg.weight_quant == "none":
        w = param(module, name, (*in_shape, *out_shape), names, cfg, std=std)
        if module.has_variable(FP8_COLLECTION, name):  # train.precision=fp8: the train step passes the scales
            y = fp8_dense(module, name, x, w, contract=len(in_shape))
        else:
            y = dense(x, w, contract=len(in_shape), impl=cfg.decode_kernels)
        if module.is_mutable_collection(PACKED_COLLECTION) and not module.is_initializing():  # pack_for_cpu's pass
            module.put_variable(PACKED_COLLECTION, name, pack_weight(w.reshape(k, n)))
    else:
        y = quantized_dense(module, name, x, in_shape, out_shape, flat_names, cfg)
    if cfg.lora_rank and name in cfg.lora_targets.split(","):
        y = y + lora_delta(module, name, x, in_shape, out_shape, flat_names, cfg)
    return checkpoint_name(y, checkpoint_tag(name))  # what a named remat policy saves (tpustack.remat)


def lora_delta(module: nn.Module, name: str, x: jax.Array, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
               names: tuple[str | None, str | None], cfg: ModelConfig) -> jax.Array:
    """(alpha / r) (x A) B, LoRA's low-rank update of W (model.lora_rank r > 0): `<name>_lora_a`
    [K, r] drawn like peft's (uniform, bound 1/sqrt(K)), `<name>_lora_b` [r, N] zero, so it starts at 0."""
    k, n, r = math.prod(in_shape), math.prod(out_shape), cfg.lora_rank
    uniform = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")  # bound sqrt(3 / 3K)
    a_KR = module.param(f"{name}_lora_a", nn.with_logical_partitioning(uniform, (names[0], None)), (k, r),
                        dtype_of(cfg.param_dtype)).astype(dtype_of(cfg.dtype))
    b_RN = module.param(f"{name}_lora_b", nn.with_logical_partitioning(nn.initializers.zeros, (None, names[1])),
                        (r, n), dtype_of(cfg.param_dtype)).astype(dtype_of(cfg.dtype))
    lead = x.shape[: x.ndim - len(in_shape)]
    y_MN = (x.reshape(-1, k) @ a_KR) @ b_RN * (cfg.lora_alpha / r)
    return y_MN.reshape(*lead, *out_shape).astype(x.dtype)


def use_kernels(cfg: ModelConfig) -> str | None:
    """The tpustack.kernels impl= to use for attention, or None for the einsum path here.

    "auto" means Pallas when the target (the mesh's devices: a TPU topology compiled on a CPU
    host counts as TPU) is TPU/GPU; on CPU the einsum path is the faster one."""
    if cfg.attention_impl == "pallas":
        return "pallas"
    if cfg.attention_impl == "auto" and compat.backend() != "cpu":
        return "auto"
    return None


def kernel_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, impl: str) -> jax.Array:
    """Causal flash attention from tpustack.kernels; inside shard_map when on a mesh, since a
    Pallas call sees one device's block (batch over data x fsdp, heads over tensor)."""
    fn = partial(flash_attention, causal=True, impl=impl)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(q_BTNH, k_BSKH, v_BSKH)
    def spec_for(x: jax.Array, names: tuple) -> jax.sharding.PartitionSpec:
        # A dim its mesh axes do not divide (the batch of 1 that init traces with) stays whole.
        axes = nn.logical_to_mesh_axes(names)
        fits = lambda dim, a: a is None or dim % math.prod(  # noqa: E731
            mesh.shape[n] for n in (a if isinstance(a, tuple) else (a,))) == 0
        return jax.sharding.PartitionSpec(*(a if fits(d, a) else None for d, a in zip(x.shape, axes)))

    q_spec = spec_for(q_BTNH, ("batch", "length", "act_heads", None))
    kv_spec = spec_for(k_BSKH, ("batch", "length", "act_kv_heads", None))
    return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                         check_vma=False)(q_BTNH, k_BSKH, v_BSKH)


def cache_attention_cpu(q_BTNH: jax.Array, cache, positions_BT: jax.Array) -> jax.Array:
    """Each query over its row's cached keys at or before its position, through the native CPU
    paged kernel: the [B, S, K, H] cache is B pages of S slots, query (b, t) reads page b."""
    b, t, n, h = q_BTNH.shape
    rows_R1 = jnp.repeat(jnp.arange(b, dtype=jnp.int32), t)[:, None]
    out_RNH = paged_attention(q_BTNH.reshape(b * t, n, h), cache.k_BSKH, cache.v_BSKH, rows_R1,
                              (positions_BT + 1).reshape(b * t), impl="cpu")
    return out_RNH.reshape(b, t, n, h)


def rope_tables(positions_BT: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, T, H] in the Hugging Face rotate-half layout."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    emb_BTH = jnp.concatenate([freqs_BTh, freqs_BTh], axis=-1)
    return jnp.cos(emb_BTH), jnp.sin(emb_BTH)


def apply_rope(x_BTNH: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array) -> jax.Array:
    half = x_BTNH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)
    cos, sin = cos_BTH[:, :, None, :], sin_BTH[:, :, None, :]
    out = x_BTNH.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
    return out.astype(x_BTNH.dtype)


def grouped_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                      mask_BTS: jax.Array | None) -> jax.Array:
    """Softmax attention with K kv heads shared by N query heads, without repeating K/V.

    The G query heads of a kv head are folded into the query rows (M = G * T), so both
    matmuls are plain batched [B, K] matmuls with the head dim minor: the transposes this
    needs move whole H-rows, where "btkgh,bskh->bkgts" made XLA CPU copy element-strided
    (fwd + bwd of this layout ran ~25% faster on CPU).
    """
    b, t, n, h = q_BTNH.shape
    k_heads, g = k_BSKH.shape[2], n // k_BSKH.shape[2]
    q_BKGTH = jnp.transpose(q_BTNH.reshape(b, t, k_heads, g, h), (0, 2, 3, 1, 4)) * (1.0 / math.sqrt(h))
    q_BKMH = q_BKGTH.reshape(b, k_heads, g * t, h)
    k_BKSH = jnp.transpose(k_BSKH, (0, 2, 1, 3))
    v_BKSH = jnp.transpose(v_BSKH, (0, 2, 1, 3))
    scores_BKMS = jnp.einsum("bkmh,bksh->bkms", q_BKMH, k_BKSH, preferred_element_type=jnp.float32)
    scores_BKGTS = scores_BKMS.reshape(b, k_heads, g, t, -1)
    if mask_BTS is not None:
        scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKMS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKH.dtype).reshape(b, k_heads, g * t, -1)
    out_BKMH = jnp.einsum("bkms,bksh->bkmh", probs_BKMS, v_BKSH)
    out_BTKGH = jnp.transpose(out_BKMH.reshape(b, k_heads, g, t, h), (0, 3, 1, 2, 4))
    return out_BTKGH.reshape(b, t, n, h)


PREFILL_QUERY_BLOCK = 512


def causal_attention_in_blocks(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array,
                               block: int | None = None) -> jax.Array:
    """Causal grouped attention of a prompt over its own keys, `block` queries at a time (a
    sequential map), so the scores held at once are [B, K, G * block, T], not [B, K, G * T, T]:
    64 prompts of 2048 tokens would need 12.9 GB of f32 scores per layer in one piece. Each
    query row's softmax is the one grouped_attention computes."""
    block = block or PREFILL_QUERY_BLOCK
    b, t, n, h = q_BTNH.shape
    if t <= block or t % block:
        return grouped_attention(q_BTNH, k_BTKH, v_BTKH, jnp.tril(jnp.ones((t, t), dtype=bool))[None])
    q_CBTNH = jnp.moveaxis(q_BTNH.reshape(b, t // block, block, n, h), 1, 0)

    def one(args):
        c, q_BQNH = args
        mask_QT = (c * block + jnp.arange(block))[:, None] >= jnp.arange(t)[None, :]
        return grouped_attention(q_BQNH, k_BTKH, v_BTKH, mask_QT[None])

    out_CBQNH = jax.lax.map(one, (jnp.arange(t // block), q_CBTNH))
    return jnp.moveaxis(out_CBQNH, 0, 1).reshape(b, t, n, h)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array,
                 positions_BT: jax.Array | None = None, cache=None, prefill: bool = False):
        """Training: causal self-attention. With a LayerCache (decoding): write this step's
        keys/values at `positions_BT`, attend over the cache, return (out, new cache)."""
        cfg = self.cfg
        d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.heads_dim
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        q_BTNH = apply_rope(linear(self, "q", x_BTD, (d,), (n, h), ("embed", "heads", "head_dim"), cfg),
                            cos_BTH, sin_BTH)
        k_BTKH = apply_rope(linear(self, "k", x_BTD, (d,), (k, h), ("embed", "kv_heads", "head_dim"), cfg),
                            cos_BTH, sin_BTH)
        v_BTKH = linear(self, "v", x_BTD, (d,), (k, h), ("embed", "kv_heads", "head_dim"), cfg)
        project_out = lambda o_BTNH: linear(self, "o", o_BTNH, (n, h), (d,),  # noqa: E731
                                            ("heads", "head_dim", "embed"), cfg, std=out_std)
        q_BTNH = nn.with_logical_constraint(q_BTNH, ("batch", "length", "act_heads", None))
        if cache is not None:
            cache = cache.write(k_BTKH, v_BTKH, positions_BT)
            if hasattr(cache, "attend"):  # a paged cache (tpustack.infer.paged) owns its attention
                return project_out(cache.attend(q_BTNH, positions_BT)), cache
            if prefill:  # prompts start at 0: attend over their own keys, not the whole (empty) cache
                if use_kernels(cfg) is not None:
                    return project_out(kernel_attention(q_BTNH, k_BTKH, v_BTKH, use_kernels(cfg))), cache
                return project_out(causal_attention_in_blocks(q_BTNH, k_BTKH, v_BTKH)), cache
            # a query sees every cached key at or before its own position; later slots
            # hold stale entries (padding, rejected drafts) and are masked
            impl = use_kernels(cfg)
            if impl is not None and q_BTNH.shape[1] == 1:  # a decode step: the decode kernel
                out_BNH = decode_attention(q_BTNH[:, 0], cache.k_BSKH, cache.v_BSKH, positions_BT[:, 0] + 1,
                                           k_scale_BSK=cache.k_scale_BSK, v_scale_BSK=cache.v_scale_BSK,
                                           impl=impl)
                return project_out(out_BNH[:, None]), cache
            if impl is None and cfg.decode_kernels == "auto" and not cache.quantized and compat.backend() == "cpu" \
                    and paged_attention_impl(cache.k_BSKH.shape[1], h, q_BTNH.dtype,
                                             page_dtype=cache.k_BSKH.dtype) == "cpu":
                # CPU: the native paged kernel reads the cache in place, one page per row; XLA's
                # einsums copied the whole cache to [B, K, S, H] in every layer of every step
                return project_out(cache_attention_cpu(q_BTNH, cache, positions_BT)), cache
            k_BSKH, v_BSKH = cache.read(q_BTNH.dtype)
            mask_BTS = jnp.arange(k_BSKH.shape[1])[None, None, :] <= positions_BT[:, :, None]
            out_BTNH = grouped_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS)
            return project_out(out_BTNH), cache
        if cfg.attention_impl == "cudnn":
            out_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, is_causal=True,
                                                    implementation="cudnn")
        elif use_kernels(cfg) is not None:
            out_BTNH = kernel_attention(q_BTNH, k_BTKH, v_BTKH, use_kernels(cfg))
        else:
            t = x_BTD.shape[1]
            causal_TS = jnp.tril(jnp.ones((t, t), dtype=bool))
            out_BTNH = grouped_attention(q_BTNH, k_BTKH, v_BTKH, causal_TS[None])
        return project_out(out_BTNH)


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cfg = self.cfg
        d, f = cfg.d_model, cfg.ffn_dim
        gate_BTF = linear(self, "gate", x_BTD, (d,), (f,), ("embed", "mlp"), cfg)
        up_BTF = linear(self, "up", x_BTD, (d,), (f,), ("embed", "mlp"), cfg)
        h_BTF = nn.with_logical_constraint(jax.nn.silu(gate_BTF) * up_BTF, ("batch", "length", "act_mlp"))
        return linear(self, "down", h_BTF, (f,), (d,), ("mlp", "embed"), cfg,
                      std=cfg.init_std / math.sqrt(2 * cfg.num_layers))
