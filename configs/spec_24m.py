"""A 23.0M-parameter byte-level Llama: the target of the speculative-decoding goal (issue 11:
a target of at least 20M parameters trained here, a draft distilled to at most 1/8 of it, see
configs/spec_draft.py). Cheap to train: 8 layers of d_model 512, GQA 8/2, ffn 1408.

    nice -n 5 tpustack train --config configs/spec_24m.py --workdir runs/spec_target
    python -c "from tpustack.config import load_config; print(load_config('configs/spec_24m.py').model.num_params())"
"""

from tpustack.config import default_config_dict


def get_config(arg=None):
    cfg = default_config_dict()
    cfg.name = "spec_24m"
    m = cfg.model
    m.vocab_size = 384  # 256 bytes + BOS/EOS, padded to a multiple of 128
    m.d_model = 512
    m.num_layers = 8
    m.num_heads = 8
    m.num_kv_heads = 2
    m.ffn_dim = 1408
    m.max_seq_len = 1024
    t = cfg.train
    t.steps = 260
    t.batch_size = 16
    t.seq_len = 256
    t.lr = 2e-3
    t.warmup_steps = 26
    t.time_limit_s = 2400.0
    t.eval_every = 100
    cfg.checkpoint.every = 50
    return cfg
