"""Llama-2-7B (6.74B parameters): MHA, 4k context.

Full size: used for ahead-of-time TPU compiles and estimates, not for CPU training.

    tpustack train --config configs/llama2_7b.py --workdir gs://BUCKET/llama2_7b --config.mesh.fsdp=-1
"""

from tpustack.config import default_config_dict


def get_config(arg=None):
    cfg = default_config_dict()
    cfg.name = "llama2_7b"
    m = cfg.model
    m.vocab_size = 32000
    m.d_model = 4096
    m.num_layers = 32
    m.num_heads = 32
    m.num_kv_heads = 32
    m.ffn_dim = 11008
    m.rope_theta = 10000.0
    m.max_seq_len = 4096
    m.tie_embeddings = False
    m.param_dtype = "float32"
    m.dtype = "bfloat16"
    m.scan_layers = True
    m.remat_policy = "nothing_saveable"
    t = cfg.train
    t.precision = "bf16"
    t.batch_size = 256
    t.seq_len = 4096
    t.lr = 3e-4
    t.warmup_steps = 2000
    t.steps = 100000
    return cfg
