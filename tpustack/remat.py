"""The remat policies `model.remat_policy` takes: "none", any jax.checkpoint_policies entry by
name, or one of the named policies below over the projections' outputs.

Each dense projection's output carries a checkpoint name, "proj_<name>" (model/layers.linear:
q, k, v, o, gate, up, down), so a policy can save some projections and rerun the rest in the
backward pass. The model builds the policy from here (model/transformer.block_class), the
memory estimate counts what it saves (plan/activations.saved_dots) and the step-time
prediction what it reruns (plan/steptime.remat_recompute): one table for all three.
"""

from __future__ import annotations

import inspect
from typing import Callable

import jax

# policy -> the projections whose outputs it saves; everything else in the layer reruns
SAVED_PROJECTIONS: dict[str, tuple[str, ...]] = {
    # MaxText's `save_dot_except_mlpwi`: every projection but the MLP's two input projections
    # (gate and up, [B*T, F] each: the largest matmul outputs of a Llama layer), so the
    # backward reruns those two matmuls (about half a Llama layer's forward FLOPs) and keeps
    # the q/k/v/o/down outputs; attention (the flash kernel) reruns as under nothing_saveable.
    "save_dots_except_mlp_in": ("q", "k", "v", "o", "down"),
    # MaxText's `custom` recipes (Llama 3.1 on v6e) keep the layer input and q/k/v (offloaded
    # to host there; here in HBM) and rerun the rest
    "save_qkv_proj": ("q", "k", "v"),
}
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


def checkpoint_tag(projection: str) -> str:
    """The checkpoint name model/layers.linear gives a projection's output."""
    return f"proj_{projection}"


def is_policy(name: str) -> bool:
    """Whether `name` is a remat policy the model takes ("none" included). Of
    jax.checkpoint_policies' entries only the policies themselves, called as (prim, *args,
    **params); not the factories that make one from names (save_only_these_names, ...)."""
    if name == "none" or name in SAVED_PROJECTIONS:
        return True
    f = getattr(jax.checkpoint_policies, name, None) if not name.startswith("_") else None
    return callable(f) and any(p.kind is inspect.Parameter.VAR_KEYWORD
                               for p in inspect.signature(f).parameters.values())


def checkpoint_policy(name: str) -> Callable:
    """The jax.checkpoint policy of a (non-"none") remat policy name."""
    if name in SAVED_PROJECTIONS:
        return jax.checkpoint_policies.save_only_these_names(*(checkpoint_tag(p) for p in SAVED_PROJECTIONS[name]))
    return getattr(jax.checkpoint_policies, name)
