"""Llama-3-8B (8.03B parameters): GQA with 8 kv heads, rope theta 500k, 8k context.

Full size: used for ahead-of-time TPU compiles and estimates, not for CPU training.

    tpustack train --config configs/llama3_8b.py --workdir gs://BUCKET/llama3_8b --config.mesh.fsdp=-1
"""

from tpustack.config import default_config_dict


def get_config(arg=None):
    cfg = default_config_dict()
    cfg.name = "llama3_8b"
    m = cfg.model
    m.vocab_size = 128256
    m.d_model = 4096
    m.num_layers = 32
    m.num_heads = 32
    m.num_kv_heads = 8
    m.ffn_dim = 14336
    m.rope_theta = 500000.0
    m.max_seq_len = 8192
    m.tie_embeddings = False
    m.param_dtype = "float32"
    m.dtype = "bfloat16"
    m.scan_layers = True
    m.remat_policy = "nothing_saveable"
    t = cfg.train
    t.precision = "bf16"
    t.batch_size = 256
    t.seq_len = 8192
    t.lr = 3e-4
    t.warmup_steps = 2000
    t.steps = 100000
    return cfg
