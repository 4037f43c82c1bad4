"""Llama-family decoder in Flax linen."""

from tpustack.model.transformer import Decoder, cross_entropy

__all__ = ["Decoder", "cross_entropy"]
