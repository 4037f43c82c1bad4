"""`tpustack export`: a checkpoint's weights, through the one loader, into another format.

    tpustack export --checkpoint WORKDIR --format hf --out DIR      (DIR local or gs://)

One function per format, registered in EXPORTERS: each takes the loaded Weights and an
output directory and returns the files it wrote. `hf` writes config.json, model.safetensors,
generation_config.json, the tokenizer (the byte tokenizer as a tokenizer.json, an HF one as
it came) and its chat template (the tokenizer's own, else the default `tpustack serve`
uses): transformers' from_pretrained and AutoTokenizer load the directory; so does
load_weights.
"""

from __future__ import annotations

from typing import Callable

from tpustack import paths
from tpustack.errors import UserError
from tpustack.interop.hf import save_hf_checkpoint
from tpustack.interop.orbax_export import save_orbax_export
from tpustack.interop.tokenizer_json import write_tokenizer_files
from tpustack.weights import Weights, load_weights


def export_hf(weights: Weights, out: str, tensor_type: str | None = None) -> list[str]:
    """A Hugging Face Llama directory: config.json, model.safetensors, generation_config.json,
    the tokenizer files and the chat template (see write_tokenizer_files)."""
    if tensor_type not in (None, "f32"):
        raise UserError(f"--type {tensor_type!r}: the hf format writes f32")
    if weights.cfg.weight_quant != "none":
        raise UserError(f"--checkpoint: its params are {weights.cfg.weight_quant}-quantized; the hf format "
                        f"writes float weights: export the float checkpoint, or use --format orbax")
    tok = weights.tokenizer
    bos, eos = (tok.bos_id, tok.eos_id) if tok is not None else (None, None)
    save_hf_checkpoint(out, weights.params, weights.cfg, bos, eos)
    written = [paths.join(out, "config.json"), paths.join(out, "model.safetensors")]
    if tok is not None:
        written.append(paths.join(out, "generation_config.json"))
    return written + write_tokenizer_files(tok, out, weights.cfg.max_seq_len)


def export_gguf(weights: Weights, out: str, tensor_type: str | None = None) -> list[str]:
    """One GGUF file `out` that llama.cpp runs: f32 (default; a quantized checkpoint: its nearest type) |
    f16 | q8_0 | q4_0 | q4_k, with the tokenizer and the chat template an hf export would carry."""
    try:  # gguf is an optional extra
        from tpustack.interop.gguf import write_gguf
        from tpustack.interop.gguf_vocab import chat_template_of
    except ImportError as e:
        raise UserError(f"--format gguf: needs {e.name}; pip install 'tpustack[gguf]'") from None
    write_gguf(out, weights.params, weights.cfg, weights.tokenizer, tensor_type,
               chat_template=chat_template_of(weights.tokenizer))
    return [out]


def export_orbax(weights: Weights, out: str, tensor_type: str | None = None) -> list[str]:
    """Params only (f32, int8 or int4; a quantized checkpoint as it is) + model_config.json, plain orbax."""
    return save_orbax_export(out, weights.params, weights.cfg, weights.tokenizer, tensor_type)


# format -> exporter(weights, out, tensor_type or None) -> the paths it wrote
EXPORTERS: dict[str, Callable[[Weights, str, str | None], list[str]]] = {"hf": export_hf, "gguf": export_gguf,
                                                                         "orbax": export_orbax}


def export(checkpoint: str, fmt: str, out: str, tensor_type: str | None = None) -> list[str]:
    """Export `checkpoint` (a workdir or HF directory) as `fmt` into the new directory `out`."""
    if fmt not in EXPORTERS:
        raise UserError(f"--format {fmt!r}: one of {', '.join(EXPORTERS)}")
    if paths.isfile(out) or (paths.isdir(out) and paths.find(out)):
        raise UserError(f"--out {out!r}: exists and is not empty; pass a new directory")
    return EXPORTERS[fmt](load_weights(checkpoint), out, tensor_type)
