"""A 12.9M-parameter byte-level Llama: the model the compression and edge tables are measured on
(large enough that 4-bit and 3-bit quantization visibly cost loss), trained once on the
built-in corpus and cached under runs/small_12m.

    tpustack train --config configs/small_12m.py --workdir runs/small_12m
"""

from tpustack.config import default_config_dict


def get_config(arg=None):
    cfg = default_config_dict()
    cfg.name = "small_12m"
    m = cfg.model
    m.vocab_size = 384  # 256 bytes + BOS/EOS, padded to a multiple of 128
    m.d_model = 384  # 3 groups of 128: every matmul's input dim takes group-128 quantization
    m.num_layers = 8
    m.num_heads = 6
    m.num_kv_heads = 2
    m.ffn_dim = 1024
    m.max_seq_len = 1024
    t = cfg.train
    t.steps = 300
    t.batch_size = 16
    t.seq_len = 256
    t.lr = 2e-3
    t.warmup_steps = 30
    t.time_limit_s = 1800.0
    t.eval_every = 100
    cfg.checkpoint.every = 100
    return cfg
