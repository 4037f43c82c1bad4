"""Compression: quantization (int8, RTN, GPTQ, AWQ, NF4), pruning, LoRA/QLoRA."""
