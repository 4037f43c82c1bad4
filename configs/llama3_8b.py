"""Llama-3-8B (8.03B parameters): GQA with 8 kv heads, rope theta 500k, 8k context.

Full size: used for ahead-of-time TPU compiles and estimates, not for CPU training.

    tpustack train --config configs/llama3_8b.py --workdir gs://BUCKET/llama3_8b --config.mesh.fsdp=-1
"""

from tpustack.config import full_size_config_dict


def get_config(arg=None):
    return full_size_config_dict(
        "llama3_8b",
        vocab_size=128256,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        ffn_dim=14336,
        rope_theta=500000.0,
        max_seq_len=8192,
    )
