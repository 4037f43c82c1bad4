"""How closely llama.cpp (llama-cpp-python) runs a GGUF export against tpustack on the same weights.

The figures of issue 13, item 2, measured one way for the test (tests/test_llama_cpp.py)
and the benchmark (benchmarks/gguf_agreement.py):
  f32       max over positions of max|logits_llama - logits_ours| / max|logits_ours|,
            and whether n greedy tokens from a prompt are equal;
  quantized top-1 agreement of llama.cpp against tpustack running the file's own weights,
            dequantized (read_gguf), over held-out windows;
  tokens    whether llama.cpp's tokenizer on the exported vocab gives tpustack's ids.
llama.cpp is driven by token ids (eval, scores with logits_all), so the comparison holds
whatever the tokenizer. Dimension letters: B windows, T positions, V vocab.
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from typing import Any, Iterable

import gguf
import jax
import numpy as np

from tpustack.config import ModelConfig
from tpustack.interop.gguf import read_gguf, write_gguf
from tpustack.model import Decoder


def open_llama(path: str, n_ctx: int = 512, **kw: Any) -> Any:
    """A llama_cpp.Llama over `path` on the CPU that keeps the logits of every position."""
    import llama_cpp

    return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=min(os.cpu_count() or 1, 4),
                           logits_all=True, verbose=False, **kw)


def llama_logits(llm: Any, ids_T: np.ndarray) -> np.ndarray:
    """llama.cpp's logits [T, V] at every position of ids_T, from an empty context."""
    llm.reset()
    llm.eval([int(i) for i in ids_T])
    return np.array(llm.scores[:len(ids_T)], np.float32)


def llama_greedy(llm: Any, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens after `prompt`: llama.cpp's logits, argmax, fed back."""
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


@functools.cache
def _forward(cfg: ModelConfig) -> Any:
    return jax.jit(lambda p, x: Decoder(cfg).apply({"params": p}, x))  # one compile per config and shape


def our_logits(params: Any, cfg: ModelConfig, ids_BT: np.ndarray) -> np.ndarray:
    """tpustack's logits [B, T, V] (f32 numpy)."""
    return np.asarray(_forward(cfg)(params, ids_BT), np.float32)


def f32_figures(path: str, params: Any, cfg: ModelConfig, ids_T: np.ndarray, prompt: list[int],
                n_greedy: int = 32) -> dict[str, Any]:
    """{logits_rel_err, greedy_equal, ...} of the f32 GGUF at `path` against params."""
    from tpustack.infer.decode import Generator

    llm = open_llama(path, n_ctx=max(len(ids_T), len(prompt) + n_greedy + 1))
    ours, theirs = our_logits(params, cfg, ids_T[None])[0], llama_logits(llm, ids_T)
    rel = np.abs(theirs - ours).max(-1) / np.abs(ours).max(-1)
    want = [int(t) for t in Generator(cfg, params).generate([prompt], n_greedy)[0]][-n_greedy:]
    got = llama_greedy(llm, prompt, n_greedy)
    return {"positions": len(ids_T), "logits_rel_err": float(rel.max()), "greedy_tokens": n_greedy,
            "greedy_equal": got == want, "greedy_first_difference": next(
                (i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)}


def top1_figures(path: str, windows_BT: np.ndarray) -> dict[str, Any]:
    """Top-1 agreement of llama.cpp on the GGUF at `path` with tpustack on its dequantized weights."""
    cfg, deq, _, _ = read_gguf(path)
    ours = our_logits(deq, cfg, windows_BT).argmax(-1)
    llm = open_llama(path, n_ctx=windows_BT.shape[1])
    theirs = np.stack([llama_logits(llm, w).argmax(-1) for w in windows_BT])
    return {"positions": int(ours.size), "top1_agreement": float((ours == theirs).mean())}


def token_figures(path: str, tokenizer: Any, texts: Iterable[str]) -> dict[str, Any]:
    """How many of `texts` llama.cpp's tokenizer (vocab of the GGUF at `path`) encodes as tpustack does."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    texts = list(texts)
    differ = [t for t in texts if llm.tokenize(t.encode(), add_bos=False, special=False)
              != tokenizer.encode(t).tolist()]
    return {"strings": len(texts), "equal": len(texts) - len(differ), "first_difference": differ[0] if differ else None}


def measure(params: Any, cfg: ModelConfig, tokenizer: Any, heldout: np.ndarray, out_dir: str,
            texts: list[str], kinds: tuple[str, ...] = ("q8_0", "q4_0"), windows: int = 4,
            window_len: int = 250) -> dict[str, Any]:
    """Every figure above for one model: GGUFs written under out_dir, held-out token ids for the windows."""
    stride = (len(heldout) - window_len) // max(windows - 1, 1)
    windows_BT = np.stack([heldout[i * stride:i * stride + window_len] for i in range(windows)]).astype(np.int32)
    files = {kind: os.path.join(out_dir, f"model.{kind}.gguf") for kind in ("f32", *kinds)}
    for kind, path in files.items():
        write_gguf(path, params, cfg, tokenizer, kind)
    figures: dict[str, Any] = {"f32": f32_figures(files["f32"], params, cfg, heldout[:64],
                                                 heldout[100:140].astype(int).tolist())}
    for kind in kinds:
        figures[kind] = top1_figures(files[kind], windows_BT)
    for kind, path in files.items():
        types = Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors)
        figures[kind].update(file_bytes=os.path.getsize(path), tensor_types=dict(sorted(types.items())))
    figures["tokenization"] = token_figures(files["f32"], tokenizer, texts)
    return figures
