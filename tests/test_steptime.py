"""Predicted step time and MFU (tpustack.plan.steptime) and layout advice (tpustack.plan.suggest).

A hand-written HLO module whose every term is computed here by hand; then, on libtpu's
virtual topologies, the top `--suggest`ion of two models on two topologies compiles, fits,
and its HLO-based prediction sums to its parts and does at least the model's FLOPs.
"""

from __future__ import annotations

import pytest

from helpers import require_libtpu
from tpustack.config import load_config
from tpustack.plan import steptime, suggest
from tpustack.plan.chips import CHIPS
from tpustack.plan.hlo_cost import hlo_ops

# One bf16 [128, 256] x [256, 512] matmul per trip of a 4-trip loop, its result all-reduced
# asynchronously over 8 devices inside the loop.
HLO = """HloModule hand

%add (a: bf16[], b: bf16[]) -> bf16[] {
  %a = bf16[] parameter(0)
  %b = bf16[] parameter(1)
  ROOT %s = bf16[] add(%a, %b)
}

%cond (c: (s32[], bf16[128,256], bf16[256,512])) -> pred[] {
  %c = (s32[], bf16[128,256]{1,0}, bf16[256,512]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%c), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (t: (s32[], bf16[128,256], bf16[256,512])) -> (s32[], bf16[128,256], bf16[256,512]) {
  %t = (s32[], bf16[128,256]{1,0}, bf16[256,512]{1,0}) parameter(0)
  %x = bf16[128,256]{1,0} get-tuple-element(%t), index=1
  %w = bf16[256,512]{1,0} get-tuple-element(%t), index=2
  %dot.1 = bf16[128,512]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %all-reduce-start.1 = bf16[128,512]{1,0} all-reduce-start(%dot.1), replica_groups=[1,8]<=[8], to_apply=%add
  %all-reduce-done.1 = bf16[128,512]{1,0} all-reduce-done(%all-reduce-start.1)
  %i = s32[] get-tuple-element(%t), index=0
  ROOT %r = (s32[], bf16[128,256]{1,0}, bf16[256,512]{1,0}) tuple(%i, %x, %w)
}

ENTRY %main (p0: bf16[128,256], p1: bf16[256,512]) -> (s32[], bf16[128,256], bf16[256,512]) {
  %p0 = bf16[128,256]{1,0} parameter(0)
  %p1 = bf16[256,512]{1,0} parameter(1)
  %z = s32[] constant(0)
  %init = (s32[], bf16[128,256]{1,0}, bf16[256,512]{1,0}) tuple(%z, %p0, %p1)
  ROOT %loop = (s32[], bf16[128,256]{1,0}, bf16[256,512]{1,0}) while(%init), condition=%cond, body=%body
}
"""


def test_hand_computed_step_time_and_its_breakdown():
    ops = [o for o in hlo_ops(HLO) if o.opcode == "dot"]
    assert [(o.flops, o.bytes, o.runs) for o in ops] == [(2 * 128 * 512 * 256, 2 * (128 * 256 + 256 * 512 + 128 * 512),
                                                          4)]
    cfg = load_config("configs/tiny.py")
    st = steptime.from_hlo(HLO, cfg, "v5p:2x2x2", 8)
    v5p = CHIPS["v5p"]
    t_mem = 2 * (128 * 256 + 256 * 512 + 128 * 512) / v5p.hbm_bandwidth  # memory-bound: 1.7e-7 s > 7.3e-8 s
    assert 2 * 128 * 512 * 256 / v5p.peak_flops < t_mem
    # 2x2x2: three dims of 2 (no wraparound, one link each), one link = 600 GB/s / 6
    t_ar = 2 * 7 / 8 * (128 * 512 * 2) / (3 * v5p.interconnect_bandwidth / 6)
    assert st.compute_s == 0.0
    assert st.memory_s == pytest.approx(4 * t_mem, rel=1e-4)  # + the loop condition's compare
    assert st.collective_s == pytest.approx(4 * t_ar)
    assert st.exposed_s == pytest.approx(4 * (t_ar - t_mem), rel=1e-3)
    assert st.seconds == pytest.approx(st.compute_s + st.memory_s + st.exposed_s)
    assert st.mfu == pytest.approx(st.model_flops / (st.seconds * v5p.peak_flops))


def test_loop_trips_read_off_the_counter_step():
    # XLA TPU's windowed einsum loops compare i < 4 but add 2 to i per trip: 2 trips, not 4
    stepped = HLO.replace("ROOT %r = (s32[], bf16[128,256]{1,0}, bf16[256,512]{1,0}) tuple(%i, %x, %w)",
                          "%two = s32[] constant(2)\n  %next = s32[] add(%i, %two)\n"
                          "  ROOT %r = (s32[], bf16[128,256]{1,0}, bf16[256,512]{1,0}) tuple(%next, %x, %w)")
    assert stepped != HLO
    assert [o.runs for o in hlo_ops(stepped) if o.opcode == "dot"] == [2]
    assert [o.runs for o in hlo_ops(HLO) if o.opcode == "dot"] == [4]


def test_analytic_breakdown_sums_and_bandwidths():
    cfg = load_config("configs/llama2_7b.py", {"train.batch_size": "256"})
    mesh = {"data": 1, "stage": 1, "fsdp": 64, "tensor": 1}
    st = steptime.analytic(cfg, "v5p", mesh, "v5p:4x4x4")
    assert st.seconds == pytest.approx(st.compute_s + st.memory_s + st.exposed_s)
    assert 0.2 < st.mfu < 1.0
    # a 64-chip group on 4x4x4 drives all 6 links; 4 chips one ring (2 links); v5e 4x4 has no wraparound
    assert steptime.group_bandwidth("v5p:4x4x4", 64) == pytest.approx(CHIPS["v5p"].interconnect_bandwidth)
    assert steptime.group_bandwidth("v5p:4x4x4", 4) == pytest.approx(CHIPS["v5p"].interconnect_bandwidth / 3)
    assert steptime.group_bandwidth("v5e:4x4", 16) == pytest.approx(CHIPS["v5e"].interconnect_bandwidth / 2)
    # tensor parallelism adds exposed collectives at the same batch
    tp = steptime.analytic(cfg, "v5p", {"data": 1, "stage": 1, "fsdp": 16, "tensor": 4}, "v5p:4x4x4")
    assert tp.exposed_s > st.exposed_s


def test_suggest_beats_the_hand_picked_7b_layout():
    cfg = load_config("configs/llama2_7b.py")
    best = suggest.suggest(cfg, "configs/llama2_7b.py", "v5p", 64, top=1)[0]
    hand = load_config("configs/llama2_7b.py", {"mesh.fsdp": "-1", "train.batch_size": "256"})
    hand_mfu = steptime.analytic(hand, "v5p", {"data": 1, "stage": 1, "fsdp": 64, "tensor": 1}, "v5p:4x4x4").mfu
    assert best["step"]["mfu"] >= hand_mfu
    assert best["memory_bytes"] <= 0.9 * CHIPS["v5p"].hbm_bytes


@pytest.mark.parametrize("config_path,chip_name,topology", [("configs/tiny.py", "v5e", "v5e:2x2"),
                                                             ("configs/tiny_draft.py", "v5p", "v5p:2x2x1")])
def test_top_suggestion_compiles_and_fits(config_path, chip_name, topology):
    require_libtpu()
    from tpustack.train.aot import compile_check

    cfg = load_config(config_path, {"model.scan_layers": "True", "train.seq_len": "64"})
    top = suggest.suggest(cfg, config_path, chip_name, 4, top=3, topology=topology)
    assert len(top) == 3 and top[0]["seconds_per_token"] <= top[1]["seconds_per_token"] <= top[2]["seconds_per_token"]
    assert f"--topology {topology}" in top[0]["command"]
    r = top[0]
    laid = load_config(config_path, {"model.scan_layers": "True", "train.seq_len": "64",
                                     **{f"mesh.{k}": str(v) for k, v in r["mesh"].items()},
                                     "parallel.zero_stage": str(r["zero_stage"]), "model.remat_policy": r["remat"],
                                     "train.batch_size": str(r["batch"]),
                                     "parallel.microbatches": str(r["microbatches"])})
    out = compile_check(laid, topology)
    assert out["compiled"] and out["fits"] and out["xla_total_bytes"] <= CHIPS[chip_name].hbm_bytes
    st = out["step_time"]
    assert st["step_s"] == pytest.approx(st["compute_s"] + st["memory_s"] + st["exposed_collective_s"])
    assert 0 < st["mfu"] < 1
