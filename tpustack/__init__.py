"""tpustack: a JAX/XLA, TPU-first stack to train and serve Llama-family language models."""

__version__ = "0.1.0"
