"""Llama-2-13B (13.0B parameters): MHA, 4k context.

Full size: used for ahead-of-time TPU compiles and estimates, not for CPU training.

    tpustack train --config configs/llama2_13b.py --workdir gs://BUCKET/llama2_13b --config.mesh.fsdp=-1
"""

from tpustack.config import full_size_config_dict


def get_config(arg=None):
    return full_size_config_dict(
        "llama2_13b",
        vocab_size=32000,
        d_model=5120,
        num_layers=40,
        num_heads=40,
        num_kv_heads=40,
        ffn_dim=13824,
        rope_theta=10000.0,
        max_seq_len=4096,
    )
