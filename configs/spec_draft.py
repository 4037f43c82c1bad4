"""A 2.56M-parameter draft for configs/spec_24m.py (1/9.0 of its 22.95M: the issue's "at most
1/8"), same byte vocabulary, distilled from the trained target.

    tpustack distill --teacher runs/spec_target --config configs/spec_draft.py --workdir runs/spec_draft
    tpustack bench decode --checkpoint runs/spec_target --draft runs/spec_draft --batch 1
"""

import os

from tpustack.config import load_config_dict


def get_config(arg=None):
    cfg = load_config_dict(os.path.join(os.path.dirname(os.path.abspath(__file__)), "spec_24m.py"))
    cfg.name = "spec_draft"
    m = cfg.model
    m.d_model = 256
    m.num_layers = 4
    m.num_heads = 4
    m.num_kv_heads = 2
    m.ffn_dim = 512
    t = cfg.train
    t.steps = 200
    t.warmup_steps = 20
    t.time_limit_s = 900.0
    cfg.checkpoint.every = 50
    cfg.distill.alpha = 0.5
    cfg.distill.temperature = 2.0
    return cfg
