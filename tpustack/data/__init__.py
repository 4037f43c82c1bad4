"""Tokenizers, token sources and deterministic, resumable, per-host batching."""

from tpustack.data.batches import Batcher
from tpustack.data.sources import load_tokens
from tpustack.data.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = ["Batcher", "ByteTokenizer", "HFTokenizer", "load_tokenizer", "load_tokens"]
