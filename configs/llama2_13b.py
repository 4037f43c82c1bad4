"""Llama-2-13B (13.0B parameters): MHA, 4k context.

Full size: used for ahead-of-time TPU compiles and estimates, not for CPU training.

    tpustack train --config configs/llama2_13b.py --workdir gs://BUCKET/llama2_13b --config.mesh.fsdp=-1
"""

from tpustack.config import default_config_dict


def get_config(arg=None):
    cfg = default_config_dict()
    cfg.name = "llama2_13b"
    m = cfg.model
    m.vocab_size = 32000
    m.d_model = 5120
    m.num_layers = 40
    m.num_heads = 40
    m.num_kv_heads = 40
    m.ffn_dim = 13824
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
