"""Llama-2-7B (6.74B parameters): MHA, 4k context.

Full size: used for ahead-of-time TPU compiles and estimates, not for CPU training.

    tpustack train --config configs/llama2_7b.py --workdir gs://BUCKET/llama2_7b --config.mesh.fsdp=-1
"""

from tpustack.config import full_size_config_dict


def get_config(arg=None):
    return full_size_config_dict(
        "llama2_7b",
        vocab_size=32000,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        ffn_dim=11008,
        rope_theta=10000.0,
        max_seq_len=4096,
    )
