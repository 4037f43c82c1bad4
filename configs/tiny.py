"""The default of the main job: a 1.3M-parameter byte-level Llama trained on 2 CPU cores in < 5 minutes.

    tpustack train --config configs/tiny.py --workdir runs/tiny
"""

from tpustack.config import default_config_dict


def get_config(arg=None):
    cfg = default_config_dict()
    cfg.name = "tiny"
    m = cfg.model
    m.vocab_size = 384  # 256 bytes + BOS/EOS, padded to a multiple of 128
    # Small and fast beats big and slow at a 5-minute budget: ~2M tokens is what 2 cores
    # can process, so a model this size is already past the compute-optimal point.
    m.d_model = 192
    m.num_layers = 3
    m.num_heads = 6
    m.num_kv_heads = 2
    m.ffn_dim = 512
    m.max_seq_len = 1024
    t = cfg.train
    t.steps = 310
    t.batch_size = 64
    t.seq_len = 128
    t.lr = 3e-3
    t.warmup_steps = 31
    t.time_limit_s = 240.0  # a guard for slower machines: stop (and checkpoint) after 4 minutes
    t.eval_every = 100
    cfg.checkpoint.every = 100
    return cfg
