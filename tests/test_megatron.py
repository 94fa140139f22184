"""megatron-core 0.16 with MGUP-AdamW: real DDP + distributed optimizer + dist_checkpointing
on gloo, CPU (through tests/megatron_cpu_shim.py, which lists what it replaces).

Spawned runs (batched; the tests below assert on their results):
  A  2 ranks: distributed / plain optimizer vs single-device MGUP on identical
     gradients (fp32, bf16), scope "shard" as the control, short training runs;
  B  2 ranks: dist_checkpointing save (dp_reshardable) / load / resume, fp32 and bf16,
     and the guard against formats that would drop state;
  C  1 rank: load B's checkpoints at data-parallel size 1 and resume;
  D  3 ranks: a rank holding no param of a param group whose tensors are split among the
     others (placeholder path), and loading B's checkpoint at data-parallel size 3.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("megatron.core")

import _megatron_workers as W  # noqa: E402
from dist_utils import run_distributed  # noqa: E402

SPLIT = W.SPLIT_PARAM  # l1.weight: elements [0, 64) on rank 0, [64, 512) on rank 1


def _zero(diffs):
    return all(v == 0.0 for d in diffs for v in d.values())


@pytest.fixture(scope="module")
def run_a():
    return run_distributed(W.equivalence_and_training, 2, timeout=300)


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("megatron_ckpt"))


@pytest.fixture(scope="module")
def run_b(ckpt_root):
    return run_distributed(W.checkpoint_roundtrips, 2, ckpt_root, timeout=300)


# ----------------------------------------------------------------------- run A
@pytest.mark.timeout(400)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_distributed_optimizer_equals_single_device(run_a, dtype):
    for rank, out in enumerate(run_a):
        res = out[(dtype, "dist", "tensor")]
        assert res["inner"] == "MGUPAdamW" and res["wrapper"] == "MGUPDistributedOptimizer"
        assert res["step"] == 3.0
        # model params after the all-gather, every step: max abs diff exactly 0
        assert _zero(res["diffs"]), res["diffs"]
        # and the fp32 main shards themselves (bf16: the master weights, not only their rounding)
        assert _zero(res["main_diffs"]), res["main_diffs"]


@pytest.mark.timeout(400)
def test_split_tensor_layout(run_a):
    r0 = run_a[0][("fp32", "dist", "tensor")]["layouts"]
    r1 = run_a[1][("fp32", "dist", "tensor")]["layouts"]
    # (global_start, length, global_numel, collective)
    assert r0[SPLIT][:3] == (0, 64, 512) and r1[SPLIT][:3] == (64, 448, 512)
    assert set(r1) == {SPLIT}, "rank 1 holds only its piece of the split tensor"
    assert r0[SPLIT][3] == r1[SPLIT][3] == ((0, 512),)
    assert r0["l2.bias"][3] == (), "a param group without split tensors has no collective"


@pytest.mark.timeout(400)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_shard_scope_differs_only_on_the_split_tensor(run_a, dtype):
    """Control: per-shard top-K selects differently on the split tensor (so the exact
    match above is a real test of the cross-rank selection) and identically elsewhere."""
    first = run_a[0][(dtype, "dist", "shard")]["diffs"][0]
    assert first[SPLIT] > 0
    assert all(v == 0.0 for k, v in first.items() if k != SPLIT), first


@pytest.mark.timeout(400)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_plain_optimizer_equals_single_device(run_a, dtype):
    for out in run_a:
        assert _zero(out[(dtype, "plain", "tensor")]["diffs"])


@pytest.mark.timeout(400)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["mgup_adamw", "cmgup_adamw"])
def test_trains(run_a, dtype, name):
    for out in run_a:
        res = out["train"][(dtype, name)]
        losses = res["losses"]
        assert res["finite"]
        assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses


# ----------------------------------------------------------------------- run B
@pytest.mark.timeout(400)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_checkpoint_resume_bit_exact(run_b, dtype):
    for out in run_b:
        res = out[dtype]
        assert max(W.max_diff(res["fresh"], res["at_save"]).values()) > 0, "the fresh model must differ"
        assert _zero([W.max_diff(res["loaded"], res["at_save"])])
        assert res["step_loaded"] == 2.0 and res["step_resumed"] == 4.0
        assert _zero([W.max_diff(res["resumed"], res["cont"])])
        for name, states in res["cont_state"].items():
            for key, (start, value) in states.items():
                assert np.array_equal(value, res["resumed_state"][name][key][1]), (name, key)


@pytest.mark.timeout(400)
def test_checkpoint_format_guard(run_b):
    for out in run_b:
        guard = out["fp32"]["guard"]
        # Adam's keys only: the gathering formats lose nothing and are allowed
        assert guard["fully_reshardable_plain"] == "ok"
        assert guard["dp_zero_gather_scatter_plain"] == "ok"
        for fmt in ("fully_reshardable", "dp_zero_gather_scatter"):
            assert guard[fmt] is not None and "would drop MGUP optimizer state" in guard[fmt]
            assert "mgup_probe" in guard[fmt] and "dp_reshardable" in guard[fmt]
        # dp_reshardable keeps a state key beyond Adam's
        assert out["fp32"]["probe_ok"]


# ----------------------------------------------------------------------- runs C, D
@pytest.mark.timeout(400)
def test_checkpoint_load_at_dp1(run_b, ckpt_root):
    (res,) = run_distributed(W.checkpoint_loads, 1, ckpt_root, timeout=300)
    for dtype in ("fp32", "bf16"):
        ref = run_b[0][dtype]
        assert res[dtype]["step_loaded"] == 2.0
        assert _zero([W.max_diff(res[dtype]["loaded"], ref["at_save"])])
        # identical data on both ranks at DP=2, so DP=1 continues bit-exactly
        assert _zero([W.max_diff(res[dtype]["resumed"], ref["cont"])])


@pytest.mark.timeout(400)
def test_three_ranks_placeholder_and_load_at_dp3(run_b, ckpt_root):
    res = run_distributed(W.three_ranks, 3, ckpt_root, timeout=300)
    placeholders = [[g["n_placeholders"] for g in r["groups"]] for r in res]
    assert placeholders == [[1, 0], [0, 0], [0, 1]], placeholders
    for r in res:
        assert [g["collective"] for g in r["groups"]] == [[(0, 512)], [(1, 700)]]
        assert _zero(r["diffs"]), r["diffs"]
        assert r["load"]["step_loaded"] == 2.0
        assert _zero([W.max_diff(r["load"]["loaded"], run_b[0]["fp32"]["at_save"])])
        # DP=3 averages as 3 * (g/3), not g: close to the DP=2 continuation, not equal
        diff = W.max_diff(r["load"]["resumed"], run_b[0]["fp32"]["cont"])
        assert max(diff.values()) < 1e-4, diff


# ----------------------------------------------------------------------- options
def _config(**kw):
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(lr=1e-3, **kw)


@pytest.mark.parametrize(
    "config_kw, mgup, match",
    [
        (dict(optimizer="adam"), None, "mgup"),
        (dict(optimizer="sgd"), {}, "config.optimizer"),
        (dict(optimizer="mgup_adamw"), dict(beta=1), "unknown keys"),
        (dict(optimizer="mgup_adamw"), dict(mode="cautious"), "contradicts"),
        (dict(optimizer="adam"), dict(mode="greedy"), "mode"),
        (dict(optimizer="mgup_adamw", decoupled_weight_decay=False), {}, "decoupled_weight_decay"),
        (dict(optimizer="mgup_adamw"), [("mask_ratio", 0.5)], "dict"),
    ],
)
def test_bad_options_raise_value_error(config_kw, mgup, match):
    from mgup_dist.integrations.megatron import _resolve_options

    with pytest.raises(ValueError, match=match):
        _resolve_options(_config(**config_kw), mgup)


def test_options_precedence():
    from mgup_dist.integrations.megatron import _resolve_options

    cfg = _config(optimizer="cmgup_adamw")
    assert _resolve_options(cfg, None) == ("cmgup_adamw", {"mode": "cautious"})
    # fields added by the megatron-core patch are read when present; mgup=... wins
    cfg = dataclasses.replace(_config(optimizer="mgup_adamw"))
    cfg.mgup_mask_ratio, cfg.mgup_scope = 0.25, "shard"
    name, opts = _resolve_options(cfg, dict(mask_ratio=0.4, alpha=1.5))
    assert name == "mgup_adamw"
    assert opts == {"mode": "topk", "mask_ratio": 0.4, "scope": "shard", "alpha": 1.5}
