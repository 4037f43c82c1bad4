"""A ~1.1B Llama (Llama-3.2-1B's trunk with a 32k vocab, untied): the compiler check's big model.

Sized so its ZeRO-0 state (~18 B/param) fits an 80-95 GB chip and ZeRO-3 over 8 chips
fits a 16 GB v5e; used for ahead-of-time compiles and `tpustack estimate`, not CPU training.

    tpustack estimate --config configs/llama_1b.py --chip v5e --chips 8
"""

from tpustack.config import full_size_config_dict


def get_config(arg=None):
    return full_size_config_dict(
        "llama_1b",
        vocab_size=32000,
        d_model=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        ffn_dim=8192,
        rope_theta=500000.0,
        max_seq_len=4096,
        batch_size=16,
        seq_len=1024,
    )
