"""The training loop: data -> train_step -> metrics / eval / checkpoints, resumable.

Step n+1 is dispatched before step n's metrics are read, so the host never stalls the
device. SIGTERM (a TPU VM preemption) saves the current step and returns cleanly.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Any

import jax

from tpustack.checkpoint import Checkpointer
from tpustack.config import Config, MeshConfig
from tpustack.data import Batcher, load_tokenizer, load_tokens
from tpustack.errors import UserError
from tpustack.mesh import batch_divisor, make_mesh, rules_for
from tpustack.model.transformer import pipeline_bubble
from tpustack.metrics import MetricsWriter, Progress, flops_per_token, mfu, peak_flops_total
from tpustack.train.step import Trainer, TrainState, global_batch, make_trainer


@dataclasses.dataclass
class TrainResult:
    step: int
    losses: dict[int, float]  # step -> training loss, as logged
    eval_loss: float | None
    preempted: bool
    tokens_per_second: float
    params: Any = None  # the final parameters, on the training mesh


class _Preemption:
    """Turns SIGTERM into a flag the loop checks between steps."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            self.requested = True
        try:
            self._previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread: no handler, no preemption saves
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def check_data_fits(config: Config, tokenizer) -> None:
    if tokenizer.vocab_size > config.model.vocab_size:
        raise UserError(f"config.model.vocab_size: {config.model.vocab_size} is smaller than the tokenizer's "
                        f"{tokenizer.vocab_size}; raise it to at least {tokenizer.vocab_size}")


def evaluate(trainer: Trainer, params: Any, batcher: Batcher, num_batches: int) -> float:
    """Mean held-out loss per token over fixed batches (the same on every call)."""
    sums = []
    for i in range(num_batches):
        batch = global_batch(batcher.host_batch(i), trainer.batch_sharding, batcher.batch_size)
        sums.append(trainer.eval_step(params, batch))
    total = sum(float(s["loss_sum"]) for s in sums)
    tokens = sum(float(s["tokens"]) for s in sums)
    return total / tokens


def load_teacher(config: Config) -> tuple[Any, Any] | None:
    """The frozen teacher of a distillation run (config.distill.teacher), or None."""
    if not config.distill.teacher:
        return None
    from tpustack.infer.load import load_model

    teacher = load_model(config.distill.teacher)
    if teacher.cfg.vocab_size != config.model.vocab_size:
        raise UserError(f"config.distill.teacher: its vocabulary has {teacher.cfg.vocab_size} tokens, the "
                        f"student's {config.model.vocab_size}; they must match")
    return teacher.cfg, teacher.params


def restore_or_init(trainer: Trainer, ckpt: Checkpointer, seed: int) -> TrainState:
    if ckpt.latest_step() is not None:
        return ckpt.restore(trainer.abstract_state, trainer.state_shardings)
    return trainer.init(jax.random.key(seed))


def train(config: Config, workdir: str, stop_at_step: int | None = None, quiet: bool = False) -> TrainResult:
    """Train (resuming from workdir if it holds a checkpoint) to config.train.steps."""
    t = config.train
    mesh = make_mesh(config.mesh)
    rules = rules_for(config.mesh.rules)
    if t.batch_size % batch_divisor(mesh, rules) or (t.batch_size // t.grad_accum) % batch_divisor(mesh, rules):
        raise UserError(f"config.train.batch_size: {t.batch_size} (over {t.grad_accum} microbatches) is not "
                        f"divisible by the {batch_divisor(mesh, rules)} batch shards of the mesh")
    tokenizer = load_tokenizer(config.data.tokenizer)
    check_data_fits(config, tokenizer)
    tokens = load_tokens(config.data, tokenizer)
    pid, nproc = jax.process_index(), jax.process_count()
    train_batches = Batcher(tokens["train"], t.batch_size, t.seq_len, t.seed, "train", pid, nproc)
    eval_batches = Batcher(tokens["heldout"], t.batch_size, t.seq_len, t.seed, "heldout", pid, nproc)

    trainer = make_trainer(config, mesh, load_teacher(config))
    ckpt = Checkpointer(workdir, config.checkpoint)
    state = restore_or_init(trainer, ckpt, t.seed)
    start = int(state.step)
    last = t.steps if stop_at_step is None else min(stop_at_step, t.steps)

    writer = MetricsWriter(os.path.join(workdir, "tb"))
    flops_token = flops_per_token(config.model, t.seq_len)
    peak = peak_flops_total()
    tokens_per_step = t.batch_size * t.seq_len
    progress = Progress(total=last, initial=start, desc=config.name) if not quiet else None
    say = progress.write if progress else (lambda line: None)
    say(f"{config.name}: {config.model.num_params() / 1e6:.2f}M params, mesh {dict(mesh.shape)}, "
        f"ZeRO-{config.parallel.zero_stage}, steps {start}->{last}, workdir {workdir}")
    if mesh.shape["stage"] > 1:
        m, v = config.parallel.microbatches, config.parallel.pipeline_repeats
        kind = "GPipe" if v == 1 else f"circular, {v} chunks per stage"
        say(f"pipeline: {mesh.shape['stage']} stages x {m} microbatches ({kind}), bubble "
            f"{pipeline_bubble(mesh.shape['stage'], m, v):.1%} of each step")

    losses: dict[int, float] = {}
    eval_loss = None
    preempted = False
    pending: tuple[int, dict] | None = None
    window_start, window_steps, tps = time.perf_counter(), 0, 0.0
    run_start = time.perf_counter()

    def report(step: int, metrics: dict) -> None:
        nonlocal window_start, window_steps, tps
        window_steps += 1
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        losses[step] = values["loss"]
        if not math.isfinite(values["loss"]) and t.precision != "fp16":
            raise FloatingPointError(f"loss is {values['loss']} at step {step}")
        if (step + 1) % t.log_every == 0 or step + 1 == last:
            elapsed = time.perf_counter() - window_start
            tps = window_steps * tokens_per_step / elapsed
            values.update(tokens_per_second=tps, step_time_s=elapsed / window_steps,
                          mfu=mfu(tps, flops_token, peak))
            writer.scalars(step + 1, values, prefix="train/")
            window_start, window_steps = time.perf_counter(), 0
        if progress:
            progress.update(1, loss=f"{values['loss']:.3f}", tok_s=f"{tps:.0f}")

    def run_eval(step: int, params) -> float:
        loss = evaluate(trainer, params, eval_batches, t.eval_batches)
        writer.scalars(step, {"loss": loss, "perplexity": math.exp(min(loss, 50))}, prefix="eval/")
        unit = "nats/byte" if tokenizer.name == "byte" else "nats/token"
        say(f"step {step}: held-out loss {loss:.4f} {unit}, perplexity {math.exp(min(loss, 50)):.2f}")
        return loss

    last_saved = start
    with _Preemption() as preemption:
        for step in range(start, last):
            batch = global_batch(train_batches.host_batch(step), trainer.batch_sharding, t.batch_size)
            state, metrics = trainer.train_step(state, batch)
            if pending is not None:
                report(*pending)
            pending = (step, metrics)
            done = step + 1
            if ckpt.save(done, state, config):
                last_saved = done
            if t.eval_every and done % t.eval_every == 0 and done < last:
                report(*pending)
                pending = None
                eval_loss = run_eval(done, state.params)
            out_of_time = t.time_limit_s > 0 and time.perf_counter() - run_start > t.time_limit_s
            if preemption.requested or out_of_time:
                preempted = preemption.requested
                say(f"{'SIGTERM' if preempted else 'time limit'}: saving step {done} and stopping")
                last = done
                break
        if pending is not None:
            report(*pending)
        if last_saved != last:
            ckpt.save(last, state, config, force=True)
        if not preempted:
            eval_loss = run_eval(last, state.params)
        ckpt.close()
    if progress:
        progress.close()
    writer.close()
    return TrainResult(step=int(state.step), losses=losses, eval_loss=eval_loss, preempted=preempted,
                       tokens_per_second=tps, params=state.params)


def load_trained(workdir: str, mesh_overrides: dict[str, Any] | None = None,
                 devices: list | None = None) -> tuple[Config, Trainer, TrainState]:
    """Rebuild the trainer from a workdir's saved config and restore its latest state onto any mesh.

    By default the restored state is FSDP-sharded over all devices, whatever mesh saved it.
    """
    ckpt = Checkpointer(workdir, read_only=True)
    config = ckpt.config()
    # MeshConfig's defaults are FSDP over every device of one slice; only the rules table carries over
    mesh_cfg = dataclasses.replace(MeshConfig(rules=config.mesh.rules), **(mesh_overrides or {}))
    config = dataclasses.replace(config, mesh=mesh_cfg)
    trainer = make_trainer(config, make_mesh(config.mesh, devices))
    state = ckpt.restore(trainer.abstract_state, trainer.state_shardings)
    ckpt.close()
    return config, trainer, state


def heldout_loss(workdir: str, num_batches: int | None = None) -> tuple[Config, float]:
    """Held-out loss of a workdir's latest checkpoint."""
    config, trainer, state = load_trained(workdir)
    tokenizer = load_tokenizer(config.data.tokenizer)
    tokens = load_tokens(config.data, tokenizer)
    t = config.train
    batches = Batcher(tokens["heldout"], t.batch_size, t.seq_len, t.seed, "heldout",
                      jax.process_index(), jax.process_count())
    return config, evaluate(trainer, state.params, batches, num_batches or t.eval_batches)

