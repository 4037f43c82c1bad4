"""Decode timing: TTFT, TPOT (as vLLM defines it), tokens/s, acceptance, cost per token.

TTFT is the prefill plus the first sampled token. TPOT = (end-to-end - TTFT) /
(output tokens - 1). Cost per million output tokens: tpustack.plan.cost.cost_per_million.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from tpustack.infer.decode import Generator
from tpustack.infer.sampling import SamplingParams, stack_params
from tpustack.infer.speculative import SpeculativeGenerator
from tpustack.weights import load_weights


def time_generation(gen: Generator, prompts: list[list[int]], new_tokens: int,
                    sampling: SamplingParams | None = None) -> dict:
    """One timed generation (compile it first with a warm-up call of the same shapes)."""
    params = [sampling or SamplingParams()] * len(prompts)
    stacked = stack_params(params)
    start = time.perf_counter()
    state = gen.start(prompts, [new_tokens] * len(prompts), params)
    jax.block_until_ready(state.out_BN)
    ttft = time.perf_counter() - start
    state = gen.decode(state, stacked, new_tokens)
    jax.block_until_ready(state.out_BN)
    total = time.perf_counter() - start
    counts = np.asarray(state.count_B)
    out_tokens = int(counts.max())
    tpot = (total - ttft) / max(out_tokens - 1, 1)
    result = {"batch": len(prompts), "prompt_len": max(len(p) for p in prompts), "new_tokens": out_tokens,
              "ttft_s": ttft, "tpot_s": tpot, "e2e_s": total,
              "tokens_per_s": float(counts.sum()) / total, "decode_tokens_per_s": len(prompts) / tpot,
              "tokens": np.asarray(state.out_BN)[:, :out_tokens].tolist()}
    drafted = float(np.sum(state.drafted_B))
    if drafted:
        result["acceptance_rate"] = float(np.sum(state.accepted_B)) / drafted
    return result


def load_generator(checkpoint: str, draft: str | None = None, k: int = 4, cache_dtype: str = "float32",
                   decode_kernels: str | None = None):
    """(tokenizer, Generator or SpeculativeGenerator) of a checkpoint, through the one loader;
    decode_kernels overrides model.decode_kernels (auto | xla)."""
    cfg, params, tokenizer = load_weights(checkpoint)
    if decode_kernels is not None:
        cfg = dataclasses.replace(cfg, decode_kernels=decode_kernels)
    eos = getattr(tokenizer, "eos_id", None)
    eos = -1 if eos is None else eos
    if draft is None:
        return tokenizer, Generator(cfg, params, cache_dtype, eos)
    d_cfg, d_params, _ = load_weights(draft)
    return tokenizer, SpeculativeGenerator(cfg, params, cache_dtype, eos, draft_cfg=d_cfg, draft_params=d_params,
                                           k=k)
