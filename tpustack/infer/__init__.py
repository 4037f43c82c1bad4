"""Inference: the KV cache, sampling, the one decode loop, speculative decoding, timing."""
