"""`tpustack finetune`: LoRA / QLoRA on a frozen base loaded through tpustack.weights, resumable.

    tpustack finetune --checkpoint BASE --lora-rank 4 --lora-alpha 8 --base-quant nf4 \
        --data builtin-other --steps 200 --workdir runs/qlora

The base comes in through load_weights (a workdir or an HF directory, local or gs://), is
optionally NF4-quantized once (then expanded inside each matmul), and stays frozen: the train
state saved to WORKDIR/checkpoints (tpustack.checkpoint) holds the adapters and their Adam
moments only. WORKDIR/lora.json records the base and, at the end, the held-out loss before
and after and the trainable-state bytes. The pieces are the training loop's: Batcher batches,
the train step's loss and optimizer, StepReporter's logging, mean_loss for the eval.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp

from tpustack import paths
from tpustack.checkpoint import Checkpointer
from tpustack.compress import lora
from tpustack.config import Config, ModelConfig, config_to_dict, default_config_dict, to_config
from tpustack.data import Batcher, load_tokens
from tpustack.errors import UserError
from tpustack.evaluate import mean_loss
from tpustack.metrics import MetricsWriter, Progress
from tpustack.model import loss_sums
from tpustack.train.loop import StepReporter
from tpustack.train.step import TrainState, decoder
from tpustack.weights import load_weights


@dataclasses.dataclass(frozen=True)
class FinetuneOptions:
    checkpoint: str
    workdir: str
    rank: int = 8
    alpha: float = 16.0
    targets: str = "q,k,v,o,gate,up,down"
    base_quant: str = "none"  # none | nf4
    data: str = "builtin-other"  # builtin-other (stdlib text, not the .py the base saw) or files/dir/glob
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 1e-3
    warmup_steps: int = 10
    seed: int = 0
    eval_batches: int = 8
    heldout_fraction: float = 0.1
    save_every: int = 100
    merge_out: str = ""  # a new workdir for the merged plain checkpoint
    peft_out: str = ""  # a new directory for the PEFT adapter files


def _tokenizer_spec(tokenizer) -> str:
    if tokenizer is None:
        raise UserError("--checkpoint: names no tokenizer; fine-tuning needs one (a tpustack workdir, or an HF "
                        "directory with tokenizer.json)")
    return "byte" if tokenizer.name == "byte" else tokenizer.path


def make_config(opts: FinetuneOptions, cfg: ModelConfig, tokenizer) -> Config:
    """The fine-tune's Config: the LoRA model, AdamW without weight decay, the new text."""
    d = default_config_dict()
    d.name = "finetune"
    model = dataclasses.asdict(lora.lora_config(cfg, opts.rank, opts.alpha, opts.targets))
    d.model.update({k: v for k, v in model.items() if k not in ("dtype", "param_dtype")})
    d.train.update(steps=opts.steps, batch_size=opts.batch_size, seq_len=opts.seq_len, lr=opts.lr,
                   warmup_steps=opts.warmup_steps, weight_decay=0.0, seed=opts.seed, eval_batches=opts.eval_batches,
                   log_every=10, time_limit_s=0.0)
    source = {"builtin-other": ("builtin_text", ""), "builtin": ("builtin", "")}.get(opts.data, ("text", opts.data))
    d.data.update(source=source[0], path=source[1], tokenizer=_tokenizer_spec(tokenizer),
                  heldout_fraction=opts.heldout_fraction)
    d.checkpoint.update(every=opts.save_every, keep=2)
    return to_config(d)


def _base_record(opts: FinetuneOptions) -> dict:
    return {"checkpoint": opts.checkpoint, "base_quant": opts.base_quant, "rank": opts.rank, "alpha": opts.alpha,
            "targets": opts.targets}


def _check_resume(opts: FinetuneOptions) -> None:
    """A workdir's adapters belong to one base: refuse to resume them onto another."""
    record_path = paths.join(opts.workdir, "lora.json")
    if not paths.isfile(record_path):
        return
    saved = json.loads(paths.read_text(record_path))["base"]
    if saved != _base_record(opts):
        raise UserError(f"--workdir {opts.workdir!r}: holds adapters of {saved}; pass the same --checkpoint and "
                        f"LoRA flags, or a new --workdir")


def finetune(opts: FinetuneOptions, quiet: bool = False) -> dict:
    """Fine-tune adapters on a frozen base (resuming from opts.workdir); return lora.json's record."""
    for name, out in (("--merge-out", opts.merge_out), ("--peft-out", opts.peft_out)):
        if out and (paths.isfile(out) or (paths.isdir(out) and paths.find(out))):
            raise UserError(f"{name} {out!r}: exists and is not empty; pass a new directory")
    _check_resume(opts)
    weights = load_weights(opts.checkpoint)
    qcfg, base = lora.quantize_base(weights.cfg, weights.params, opts.base_quant)
    base = jax.device_put(base)
    config = make_config(opts, qcfg, weights.tokenizer)
    tokens = load_tokens(config.data, weights.tokenizer)
    t = config.train
    train_batches = Batcher(tokens["train"], t.batch_size, t.seq_len, t.seed, "train")
    eval_batches = Batcher(tokens["heldout"], t.batch_size, t.seq_len, t.seed, "heldout")
    state = lora.init_state(config, lora.init_adapters(config.model, t.seed))
    ckpt = Checkpointer(opts.workdir, config.checkpoint)
    try:
        if ckpt.latest_step() is not None:
            one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            state = ckpt.restore(state, jax.tree.map(lambda _: one, state))
        paths.makedirs(opts.workdir)
        paths.write_text(paths.join(opts.workdir, "lora.json"), json.dumps({"base": _base_record(opts)}, indent=2))
        state, record = _run(config, opts, ckpt, state, base, train_batches, eval_batches, quiet)
    finally:
        ckpt.close()
    record = {"base": _base_record(opts), **record, **lora.state_bytes(config, state)}
    if opts.peft_out:
        lora.export_peft(config.model, state.params, opts.peft_out, opts.checkpoint)
    if opts.merge_out:
        save_merged(config, lora.join_params(base, state.params), opts.merge_out, int(state.step))
    paths.write_text(paths.join(opts.workdir, "lora.json"), json.dumps(record, indent=2))
    return record


def _run(config: Config, opts: FinetuneOptions, ckpt: Checkpointer, state: TrainState, base: dict,
         train_batches: Batcher, eval_batches: Batcher, quiet: bool) -> tuple[TrainState, dict]:
    """The loop: step, report, save every config.checkpoint.every; held-out loss before and after."""
    t = config.train
    step_fn = jax.jit(functools.partial(lora.lora_train_step, config), donate_argnums=0)
    eval_fn = jax.jit(lambda ad, b, batch: loss_sums(decoder(config), lora.join_params(b, ad), batch))
    no_sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    heldout = lambda ad: mean_loss(lambda p, batch: eval_fn(p, base, batch), ad, eval_batches,  # noqa: E731
                                   t.eval_batches, no_sharding)
    start = int(state.step)
    writer = MetricsWriter(paths.join(opts.workdir, "tb"))
    progress = None if quiet else Progress(total=t.steps, initial=start, desc=f"finetune ({opts.base_quant} base)")
    reporter = StepReporter(config, t.steps, writer, progress)
    before = heldout(lora.zero_update(state.params))  # B = 0: the base model's own loss
    reporter.say(f"held-out loss of the base: {before:.4f}")
    saved = start
    for step in range(start, t.steps):
        batch = {k: jnp.asarray(v) for k, v in train_batches.host_batch(step).items()}
        state, metrics = step_fn(state, base, batch)
        reporter.report(step, metrics)
        if ckpt.save(step + 1, state, config):
            saved = step + 1
    if saved != t.steps:
        ckpt.save(t.steps, state, config, force=True)
    after = heldout(state.params)
    reporter.say(f"held-out loss at step {t.steps}: {after:.4f}")
    if progress:
        progress.close()
    writer.close()
    return state, {"steps": t.steps, "heldout_loss_start": before, "heldout_loss_end": after,
                   "train_losses": {str(k): v for k, v in reporter.losses.items()}}


def load_finetuned(workdir: str) -> tuple[ModelConfig, dict, dict]:
    """(LoRA model config, frozen base, trained adapters) of a fine-tune workdir, its base reloaded
    (and re-quantized) from the checkpoint lora.json names."""
    record_path = paths.join(workdir, "lora.json")
    if not paths.isfile(record_path):
        raise UserError(f"--workdir {workdir!r}: no lora.json; not a tpustack finetune workdir")
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        config = ckpt.config()
        base_record = json.loads(paths.read_text(record_path))["base"]
        weights = load_weights(base_record["checkpoint"])
        _, base = lora.quantize_base(weights.cfg, weights.params, base_record["base_quant"])
        target = jax.eval_shape(lambda: lora.init_state(config, lora.init_adapters(config.model)))
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        state = ckpt.restore(target, jax.tree.map(lambda _: one, target))
    finally:
        ckpt.close()
    return config.model, jax.device_put(base), state.params


def save_merged(config: Config, params: dict, out: str, step: int) -> ModelConfig:
    """Merge the adapters into the base and save a plain workdir checkpoint load_weights reads."""
    plain, merged = lora.merge_adapters(config.model, params)
    plain_config = dataclasses.replace(config, model=dataclasses.replace(plain, dtype=config.model.dtype),
                                       name="merged")
    to_config_check(plain_config)
    ckpt = Checkpointer(out, dataclasses.replace(config.checkpoint, async_save=False))
    try:
        ckpt.save(step, {"step": jnp.asarray(step, jnp.int32), "params": merged}, plain_config, force=True)
    finally:
        ckpt.close()
    return plain


def to_config_check(config: Config) -> None:
    """The merged config goes through the same validation as any other (a round trip of its dict)."""
    from tpustack.config import config_from_dict

    config_from_dict(config_to_dict(config))


def describe(record: dict) -> str:
    """The figures of a finished fine-tune, two lines."""
    share = record["lora_trainable_bytes"] / record["full_trainable_bytes"]
    return (f"held-out loss {record['heldout_loss_start']:.4f} -> {record['heldout_loss_end']:.4f} nats/token\n"
            f"trainable state {record['lora_trainable_bytes'] / 2**20:.2f} MiB = {share:.2%} of a full fine-tune's "
            f"{record['full_trainable_bytes'] / 2**20:.1f} MiB ({record['lora_params']:,} of "
            f"{record['model_params']:,} params)")
