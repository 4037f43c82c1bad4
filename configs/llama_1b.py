"""A ~1.1B Llama (Llama-3.2-1B's trunk with a 32k vocab, untied): the compiler check's big model.

Sized so its ZeRO-0 state (~18 B/param) fits an 80-95 GB chip and ZeRO-3 over 8 chips
fits a 16 GB v5e; used for ahead-of-time compiles and `tpustack estimate`, not CPU training.

    tpustack estimate --config configs/llama_1b.py --chip v5e --chips 8
"""

from tpustack.config import default_config_dict


def get_config(arg=None):
    cfg = default_config_dict()
    cfg.name = "llama_1b"
    m = cfg.model
    m.vocab_size = 32000
    m.d_model = 2048
    m.num_layers = 16
    m.num_heads = 32
    m.num_kv_heads = 8
    m.ffn_dim = 8192
    m.rope_theta = 500000.0
    m.max_seq_len = 4096
    m.tie_embeddings = False
    m.param_dtype = "float32"
    m.dtype = "bfloat16"
    m.scan_layers = True
    m.remat_policy = "nothing_saveable"
    t = cfg.train
    t.precision = "bf16"
    t.batch_size = 16
    t.seq_len = 1024
    t.lr = 3e-4
    t.warmup_steps = 2000
    t.steps = 100000
    return cfg
