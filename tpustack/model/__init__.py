"""Llama-family decoder in Flax linen."""

from tpustack.model.transformer import Decoder, abstract_params, cross_entropy, loss_sums, stack_layers, unstack_layers

__all__ = ["Decoder", "abstract_params", "cross_entropy", "loss_sums", "stack_layers", "unstack_layers"]
