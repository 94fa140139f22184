"""megatron-core 0.16 building apex's or Transformer Engine's FusedAdam, replaced by MGUPAdamW.

CI has neither apex nor TE (both need CUDA; apex is not on the package index), so
tests/fused_adam_standins.py provides classes with their constructors and attributes:

- apex: installed under the real import path ``apex.optimizers`` in the worker process
  before megatron-core is imported, so megatron's own ``try: from apex.optimizers import
  FusedAdam as Adam`` picks it (asserted: plain megatron builds it).
- TE: not reachable by import path alone on CPU (a successful ``import
  transformer_engine`` makes megatron import TE layers); the worker binds exactly what
  megatron's TE import branch binds (see ``_megatron_workers._bind_te_standin``).

Each run asserts that the inner optimizer becomes MGUPAdamW and that every step equals
the single-device MGUP step (max |delta| = 0.0), for the distributed and the plain
optimizer, fp32 and bf16, on 2 gloo ranks.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch

pytest.importorskip("megatron.core")

import _megatron_workers as W  # noqa: E402
import fused_adam_standins as S  # noqa: E402
from dist_utils import run_distributed  # noqa: E402


@pytest.mark.timeout(400)
@pytest.mark.parametrize("which", ["apex", "te"])
def test_fused_adam_replaced_and_step_equals_single_device(which):
    res = run_distributed(W.fused_adam_equivalence, 2, which, timeout=300)
    for out in res:
        assert out["megatron_builds"], f"megatron-core did not pick the {which} stand-in"
        for key in (("fp32", "dist"), ("fp32", "plain"), ("bf16", "dist"), ("bf16", "plain")):
            assert out[key]["inner"] == ["MGUPAdamW"], (key, out[key]["inner"])
            assert len(out[key]["diffs"]) == 3
            assert all(v == 0.0 for d in out[key]["diffs"] for v in d.values()), (key, out[key]["diffs"])


# ------------------------------------------------------------- refused by name
@pytest.fixture
def registered(monkeypatch):
    """Register both stand-in classes under their import paths for this test only."""
    for dotted, cls in ((S.APEX_MODULE, S.ApexFusedAdam), (S.TE_MODULE, S.TEFusedAdam)):
        mod = types.ModuleType(dotted)
        mod.FusedAdam = cls
        monkeypatch.setitem(sys.modules, dotted, mod)


def _params():
    return [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: S.ApexFusedAdam(p, bias_correction=False), r"apex FusedAdam: bias_correction=False"),
        (lambda p: S.ApexFusedAdam([{"params": p[:1]}, {"params": p[1:], "bias_correction": False}]),
         r"bias_correction=False \(param group 1\)"),
        (lambda p: S.ApexFusedAdam(p, adam_w_mode=False), r"adam_w_mode=False"),
        (lambda p: S.ApexFusedAdam(p, capturable=True), r"capturable=True"),
        (lambda p: S.ApexFusedAdam(p, set_grad_none=False), r"set_grad_none=False"),
        (lambda p: S.ApexFusedAdam(p, master_weights=True), r"precision-aware mode \(master_weights=True\)"),
        (lambda p: S.TEFusedAdam(p, exp_avg_dtype=torch.bfloat16, exp_avg_sq_dtype=torch.float16),
         r"Transformer Engine FusedAdam in its precision-aware mode \(exp_avg_dtype=torch.bfloat16, "
         r"exp_avg_sq_dtype=torch.float16\).*use_precision_aware_optimizer=False"),
        (lambda p: S.TEFusedAdam(p, master_weights=True, use_decoupled_grad=True),
         r"master_weights=True, use_decoupled_grad=True"),
        (lambda p: S.TEFusedAdam(p, adam_w_mode=False), r"Transformer Engine FusedAdam: adam_w_mode=False"),
        (lambda p: torch.optim.SGD(p, lr=0.1), r"torch\.optim\.sgd\.SGD inner optimizer"),
        (lambda p: torch.optim.AdamW(p, amsgrad=True), r"torch\.optim\.AdamW: amsgrad=True"),
    ],
)
def test_unsupported_options_refused_by_name(registered, make, match):
    from mgup_dist.integrations.megatron import _check_replaceable

    with pytest.raises(ValueError, match=match):
        _check_replaceable(make(_params()))


@pytest.mark.parametrize(
    "make", [S.ApexFusedAdam, S.TEFusedAdam, lambda p: S.TEFusedAdam(p, set_grad_none=True), torch.optim.AdamW]
)
def test_defaults_accepted(registered, make):
    from mgup_dist.integrations.megatron import _check_replaceable, _fused_adam_origin

    opt = make(_params())
    _check_replaceable(opt)  # no exception: AdamW-equivalent
    expect = {S.ApexFusedAdam: "apex", S.TEFusedAdam: "Transformer Engine"}.get(type(opt))
    assert _fused_adam_origin(opt) == expect


def test_stepped_fused_adam_refused(registered):
    from mgup_dist.integrations.megatron import _check_replaceable

    p = _params()
    opt = S.ApexFusedAdam(p)
    for q in p:
        q.grad = torch.ones_like(q)
    opt.step()
    with pytest.raises(RuntimeError, match="already stepped"):
        _check_replaceable(opt)


@pytest.mark.timeout(400)
def test_checkpoint_resume_with_apex_branch(tmp_path):
    """dist_checkpointing save / load / resume is bit-exact when megatron runs its apex
    branch (step kept in param groups), and the format guard still holds."""
    res = run_distributed(W.fused_adam_checkpoint, 2, str(tmp_path / "ckpt"), timeout=300)
    for out in res:
        assert out["apex_branch"]
        assert max(W.max_diff(out["fresh"], out["at_save"]).values()) > 0, "the fresh model must differ"
        assert all(v == 0.0 for v in W.max_diff(out["loaded"], out["at_save"]).values())
        assert out["step_loaded"] == 2.0 and out["step_resumed"] == 4.0
        assert all(v == 0.0 for v in W.max_diff(out["resumed"], out["cont"]).values())
        for name, states in out["cont_state"].items():
            for key, (_, value) in states.items():
                assert (value == out["resumed_state"][name][key][1]).all(), (name, key)
        assert out["guard"]["fully_reshardable_plain"] == "ok"
        assert "would drop MGUP optimizer state" in out["guard"]["fully_reshardable"]
        assert out["probe_ok"]
