"""Held-out loss: the training loop's periodic eval and the `eval` command share `mean_loss`.

The command is weights-only: the one loader (tpustack.weights) reads the params, the
workdir's saved config says which data and batch shape it was trained on.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tpustack.checkpoint import Checkpointer
from tpustack.interop.quantized_dir import read_quantized_config
from tpustack.config import Config, MeshConfig
from tpustack.data import Batcher, load_tokenizer, load_tokens
from tpustack.errors import UserError
from tpustack.mesh import batch_sharding, global_batch, make_mesh, mesh_context, param_shardings, rules_for
from tpustack.model import Decoder, loss_sums
from tpustack.weights import load_weights, weights_kind


def mean_loss(eval_step: Callable[[Any, dict], dict], params: Any, batcher: Batcher, num_batches: int,
              sharding: NamedSharding) -> float:
    """Mean loss per token over the batcher's first `num_batches` batches (the same on every call)."""
    sums = [eval_step(params, global_batch(batcher.host_batch(i), sharding, batcher.batch_size))
            for i in range(num_batches)]
    return sum(float(s["loss_sum"]) for s in sums) / sum(float(s["tokens"]) for s in sums)


def heldout_loss(workdir: str, num_batches: int | None = None, mesh: Mesh | None = None) -> tuple[Config, float]:
    """Held-out loss of a workdir's latest checkpoint, params sharded over `mesh` (default:
    FSDP over every device), with the data and batch shape it was trained with."""
    kind = weights_kind(workdir)
    if kind == "quantized":  # a `tpustack quantize` directory keeps its run's config
        config = read_quantized_config(workdir)
    elif kind != "workdir":
        raise UserError(f"--workdir {workdir!r}: eval needs a tpustack workdir or a quantized directory "
                        f"(its config names the data)")
    else:
        ckpt = Checkpointer(workdir, read_only=True)
        config = ckpt.config()
        ckpt.close()
    mesh = mesh or make_mesh(MeshConfig(rules=config.mesh.rules))
    rules = rules_for(config.mesh.rules)
    cfg, params, _ = load_weights(workdir, mesh, config.mesh.rules)
    t = config.train
    tokens = load_tokens(config.data, load_tokenizer(config.data.tokenizer))
    batches = Batcher(tokens["heldout"], t.batch_size, t.seq_len, t.seed, "heldout",
                      jax.process_index(), jax.process_count())
    step = jax.jit(functools.partial(loss_sums, Decoder(cfg)),
                   in_shardings=(param_shardings(cfg, mesh, rules), batch_sharding(mesh, rules)),
                   out_shardings=NamedSharding(mesh, PartitionSpec()))

    def eval_step(p, batch):
        with mesh_context(mesh, rules):
            return step(p, batch)
    return config, mean_loss(eval_step, params, batches, num_batches or t.eval_batches, batch_sharding(mesh, rules))
