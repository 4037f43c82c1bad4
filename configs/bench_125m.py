"""The CPU benchmark shape (124.7M parameters): vocab 32000, d 768, 12 layers, 12/4 heads.

    python benchmarks/train_cpu.py
"""

from tpustack.config import default_config_dict


def get_config(arg=None):
    cfg = default_config_dict()
    cfg.name = "bench_125m"
    m = cfg.model
    m.vocab_size = 32000
    m.d_model = 768
    m.num_layers = 12
    m.num_heads = 12
    m.num_kv_heads = 4
    m.ffn_dim = 2048
    m.tie_embeddings = False
    m.max_seq_len = 2048
    t = cfg.train
    t.batch_size = 8
    t.seq_len = 256
    t.lr = 6e-4
    return cfg
