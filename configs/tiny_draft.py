"""A draft for configs/tiny.py (5x fewer parameters, same byte vocabulary), distilled from it.

    tpustack train --workdir runs/tiny                                  # the teacher
    tpustack distill --teacher runs/tiny --config configs/tiny_draft.py --workdir runs/tiny_draft
    tpustack generate --checkpoint runs/tiny --draft runs/tiny_draft --prompt "def "
"""

import os

from tpustack.config import load_config_dict


def get_config(arg=None):
    cfg = load_config_dict(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))
    cfg.name = "tiny_draft"
    m = cfg.model
    m.d_model = 96
    m.num_layers = 2
    m.num_heads = 3
    m.num_kv_heads = 1
    m.ffn_dim = 256
    cfg.train.steps = 200
    cfg.train.warmup_steps = 20
    cfg.distill.alpha = 0.5
    cfg.distill.temperature = 2.0
    return cfg
