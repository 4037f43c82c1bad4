"""The training loop: data -> train_step -> metrics / eval / checkpoints, resumable.

Step n+1 is dispatched before step n's metrics are read, so the host never stalls the
device. SIGTERM (a TPU VM preemption) and the time limit stop every host after the same
step (train.preemption), which is saved before the loop returns; the checkpoint manager
is closed in a `finally`, so the last asynchronous save always completes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax

from tpustack import paths
from tpustack.checkpoint import Checkpointer
from tpustack.config import Config, MeshConfig
from tpustack.data import Batcher, load_tokenizer, load_tokens
from tpustack.errors import UserError
from tpustack.evaluate import mean_loss
from tpustack.mesh import batch_divisor, global_batch, make_mesh, rules_for
from tpustack.metrics import MetricsWriter, Progress, flops_per_token, mfu, peak_flops_total
from tpustack.train.pipeline import pipeline_bubble
from tpustack.train.preemption import StopSignal
from tpustack.train.step import Teacher, Trainer, TrainState
from tpustack.weights import load_weights


@dataclasses.dataclass
class TrainResult:
    step: int
    losses: dict[int, float]  # step -> training loss, as logged
    eval_loss: float | None
    preempted: bool
    tokens_per_second: float
    params: Any = None  # the final parameters, on the training mesh


class StepReporter:
    """Turns each step's metrics into the loss record, TensorBoard scalars and the progress bar."""

    def __init__(self, config: Config, last: int, writer: MetricsWriter, progress: Progress | None):
        self.config, self.last, self.writer, self.progress = config, last, writer, progress
        self.losses: dict[int, float] = {}
        self.flops_token = flops_per_token(config.model, config.train.seq_len)
        self.peak = peak_flops_total()
        self.window_start, self.window_steps, self.tokens_per_second = time.perf_counter(), 0, 0.0

    def report(self, step: int, metrics: dict) -> None:
        t = self.config.train
        self.window_steps += 1
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        self.losses[step] = values["loss"]
        if not math.isfinite(values["loss"]) and t.precision != "fp16":
            raise FloatingPointError(f"loss is {values['loss']} at step {step}")
        if (step + 1) % t.log_every == 0 or step + 1 == self.last:
            elapsed = time.perf_counter() - self.window_start
            self.tokens_per_second = self.window_steps * t.batch_size * t.seq_len / elapsed
            values.update(tokens_per_second=self.tokens_per_second, step_time_s=elapsed / self.window_steps,
                          mfu=mfu(self.tokens_per_second, self.flops_token, self.peak))
            self.writer.scalars(step + 1, values, prefix="train/")
            self.window_start, self.window_steps = time.perf_counter(), 0
        if self.progress:
            self.progress.update(1, loss=f"{values['loss']:.3f}", tok_s=f"{self.tokens_per_second:.0f}")

    def say(self, line: str) -> None:
        if self.progress:
            self.progress.write(line)


def check_data_fits(config: Config, tokenizer) -> None:
    if tokenizer.vocab_size > config.model.vocab_size:
        raise UserError(f"config.model.vocab_size: {config.model.vocab_size} is smaller than the tokenizer's "
                        f"{tokenizer.vocab_size}; raise it to at least {tokenizer.vocab_size}")


def load_teacher(config: Config) -> Teacher | None:
    """The frozen teacher of a distillation run (config.distill.teacher), computing at the
    student's precision, or None."""
    if not config.distill.teacher:
        return None
    cfg, params, _ = load_weights(config.distill.teacher)
    if cfg.vocab_size != config.model.vocab_size:
        raise UserError(f"config.distill.teacher: its vocabulary has {cfg.vocab_size} tokens, the "
                        f"student's {config.model.vocab_size}; they must match")
    return Teacher(dataclasses.replace(cfg, dtype=config.model.dtype), params)


def restore_or_init(trainer: Trainer, ckpt: Checkpointer, seed: int) -> TrainState:
    if ckpt.latest_step() is not None:
        return ckpt.restore(trainer.abstract_state, trainer.state_shardings)
    return trainer.init(jax.random.key(seed))


def _batchers(config: Config, mesh) -> tuple[Any, Batcher, Batcher]:
    t = config.train
    rules = rules_for(config.mesh.rules)
    if t.batch_size % batch_divisor(mesh, rules) or (t.batch_size // t.grad_accum) % batch_divisor(mesh, rules):
        raise UserError(f"config.train.batch_size: {t.batch_size} (over {t.grad_accum} microbatches) is not "
                        f"divisible by the {batch_divisor(mesh, rules)} batch shards of the mesh")
    tokenizer = load_tokenizer(config.data.tokenizer)
    check_data_fits(config, tokenizer)
    tokens = load_tokens(config.data, tokenizer)
    pid, nproc = jax.process_index(), jax.process_count()
    return (tokenizer, Batcher(tokens["train"], t.batch_size, t.seq_len, t.seed, "train", pid, nproc),
            Batcher(tokens["heldout"], t.batch_size, t.seq_len, t.seed, "heldout", pid, nproc))


def train(config: Config, workdir: str, stop_at_step: int | None = None, quiet: bool = False) -> TrainResult:
    """Train (resuming from workdir if it holds a checkpoint) to config.train.steps."""
    with StopSignal(config.train.time_limit_s) as stop:  # before restore and data: a signal is kept
        mesh = make_mesh(config.mesh)
        tokenizer, train_batches, eval_batches = _batchers(config, mesh)
        trainer = Trainer(config, mesh, load_teacher(config))
        ckpt = Checkpointer(workdir, config.checkpoint)
        try:
            state = restore_or_init(trainer, ckpt, config.train.seed)
            return _run(config, workdir, trainer, ckpt, state, stop, tokenizer, train_batches, eval_batches,
                        stop_at_step, quiet)
        finally:
            ckpt.close()  # waits for the last asynchronous save


def _run(config: Config, workdir: str, trainer: Trainer, ckpt: Checkpointer, state: TrainState, stop: StopSignal,
         tokenizer, train_batches: Batcher, eval_batches: Batcher, stop_at_step: int | None,
         quiet: bool) -> TrainResult:
    t, mesh = config.train, trainer.mesh
    start = int(state.step)
    last = t.steps if stop_at_step is None else min(stop_at_step, t.steps)
    writer = MetricsWriter(paths.join(workdir, "tb"))
    progress = Progress(total=last, initial=start, desc=config.name) if not quiet else None
    reporter = StepReporter(config, last, writer, progress)
    reporter.say(f"{config.name}: {config.model.num_params() / 1e6:.2f}M params, mesh {dict(mesh.shape)}, "
                 f"ZeRO-{config.parallel.zero_stage}, steps {start}->{last}, workdir {workdir}")
    if mesh.shape["stage"] > 1:
        m, v = config.parallel.microbatches, config.parallel.pipeline_repeats
        kind = "GPipe" if v == 1 else f"circular, {v} chunks per stage"
        reporter.say(f"pipeline: {mesh.shape['stage']} stages x {m} microbatches ({kind}), bubble "
                     f"{pipeline_bubble(mesh.shape['stage'], m, v):.1%} of each step")

    def run_eval(step: int, params) -> float:
        loss = mean_loss(trainer.eval_step, params, eval_batches, t.eval_batches, trainer.batch_sharding)
        writer.scalars(step, {"loss": loss, "perplexity": math.exp(min(loss, 50))}, prefix="eval/")
        unit = "nats/byte" if tokenizer.name == "byte" else "nats/token"
        reporter.say(f"step {step}: held-out loss {loss:.4f} {unit}, perplexity {math.exp(min(loss, 50)):.2f}")
        return loss

    eval_loss, reason, saved = None, None, start
    pending: tuple[int, dict] | None = None
    for step in range(start, last):
        batch = global_batch(train_batches.host_batch(step), trainer.batch_sharding, t.batch_size)
        state, metrics = trainer.train_step(state, batch)
        if pending is not None:
            reporter.report(*pending)
        pending, done = (step, metrics), step + 1
        if ckpt.save(done, state, config):
            saved = done
        if t.eval_every and done % t.eval_every == 0 and done < last:
            reporter.report(*pending)
            pending = None
            eval_loss = run_eval(done, state.params)
        reason = stop.reason(done) if done < last else None
        if reason is not None:
            reporter.say(f"{reason}: saving step {done} and stopping")
            last = done
            break
    if pending is not None:
        reporter.report(*pending)
    if saved != last:
        ckpt.save(last, state, config, force=True)
    preempted = reason == "SIGTERM"
    if not preempted:
        eval_loss = run_eval(last, state.params)
    if progress:
        progress.close()
    writer.close()
    return TrainResult(step=int(state.step), losses=reporter.losses, eval_loss=eval_loss, preempted=preempted,
                       tokens_per_second=reporter.tokens_per_second, params=state.params)


def load_trained(workdir: str, mesh_overrides: dict[str, Any] | None = None,
                 devices: list | None = None) -> tuple[Config, Trainer, TrainState]:
    """The whole train state of a workdir's latest checkpoint (Adam moments included), restored
    onto any mesh: by default FSDP over all devices, whatever mesh saved it. Weights-only
    readers use tpustack.weights.load_weights instead."""
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        config = ckpt.config()
        # MeshConfig's defaults are FSDP over every device of one slice; only the rules table carries over
        mesh_cfg = dataclasses.replace(MeshConfig(rules=config.mesh.rules), **(mesh_overrides or {}))
        config = dataclasses.replace(config, mesh=mesh_cfg)
        trainer = Trainer(config, make_mesh(config.mesh, devices))
        return config, trainer, ckpt.restore(trainer.abstract_state, trainer.state_shardings)
    finally:
        ckpt.close()
