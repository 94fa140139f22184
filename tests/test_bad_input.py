"""Bad user input: ValueError naming the parameter and what is allowed."""
from __future__ import annotations

import pytest
import torch

import mgup_dist
from mgup_dist import CMGUPAdamW, MGUPAdamW, MGUPLion, MGUPMuon

ALL = sorted(mgup_dist.OPTIMIZERS)


def _params():
    return [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]


def _expect(fn, name, *allowed):
    """fn() raises ValueError whose message names ``name`` and shows each of ``allowed``."""
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    assert name in msg, f"message does not name {name!r}: {msg}"
    for a in allowed:
        assert a in msg, f"message does not show the allowed {a!r}: {msg}"
    return msg


# (kwarg, bad value, name the message must contain, fragments of the allowed range)
COMMON = [
    ("lr", -1e-3, "lr", ("0",)),
    ("lr", float("nan"), "lr", ()),
    ("weight_decay", -0.1, "weight_decay", ("0",)),
    ("mask_ratio", -0.1, "mask_ratio", ("0", "1")),
    ("mask_ratio", 1.5, "mask_ratio", ("0", "1")),
    ("mask_ratio", "0.5", "mask_ratio", ()),
    ("alpha", 0.0, "alpha", ("0",)),
    ("alpha", -2.0, "alpha", ("0",)),
    ("gamma", -0.5, "gamma", ("0",)),
    ("tau", 0.0, "tau", ("0", "1")),
    ("tau", 1.5, "tau", ("0", "1")),
    ("tau", -0.5, "tau", ("0", "1")),
    ("mode", "sign", "mode", ("topk", "cautious")),
    ("scope", "layer", "scope", ("tensor", "shard", "global")),
]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("kw,bad,label,allowed", COMMON, ids=[f"{c[0]}={c[1]!r}" for c in COMMON])
def test_common_options_are_validated(name, kw, bad, label, allowed):
    cls = mgup_dist.OPTIMIZERS[name]
    _expect(lambda: cls(_params(), **{kw: bad}), label, *allowed)


@pytest.mark.parametrize("cls", [MGUPAdamW, MGUPLion, MGUPMuon], ids=lambda c: c.__name__)
@pytest.mark.parametrize("betas,label", [((1.0, 0.99), "betas[0]"), ((-0.1, 0.99), "betas[0]"),
                                         ((0.9, 1.0), "betas[1]"), ((0.9, -1e-3), "betas[1]")])
def test_betas_out_of_range(cls, betas, label):
    _expect(lambda: cls(_params(), betas=betas), label, "0", "1")


@pytest.mark.parametrize("cls", [MGUPAdamW, MGUPLion, MGUPMuon], ids=lambda c: c.__name__)
def test_betas_not_a_pair(cls):
    _expect(lambda: cls(_params(), betas=(0.9,)), "betas")


@pytest.mark.parametrize("cls", [MGUPAdamW, MGUPMuon], ids=lambda c: c.__name__)
def test_eps_negative(cls):
    _expect(lambda: cls(_params(), eps=-1e-8), "eps", "0")


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("extra", [dict(alpha=2.0), dict(gamma=0.5), dict(alpha=2.0, gamma=0.5)],
                         ids=["alpha", "gamma", "both"])
def test_tau_together_with_alpha_or_gamma(name, extra):
    cls = mgup_dist.OPTIMIZERS[name]
    msg = _expect(lambda: cls(_params(), tau=0.5, **extra), "tau")
    assert "alpha" in msg and "gamma" in msg


def test_gamma_above_alpha_is_rejected_or_documented():
    # gamma > alpha would invert MGUP (misaligned coordinates stepping further)
    _expect(lambda: MGUPAdamW(_params(), alpha=1.0, gamma=2.0), "gamma")


def test_param_group_overrides_are_validated_too():
    opt = MGUPAdamW(_params())
    _expect(lambda: opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(5))], "mask_ratio": 2.0}),
            "mask_ratio", "0", "1")
    _expect(lambda: opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(5))], "mode": "both"}),
            "mode", "topk")
    _expect(lambda: MGUPAdamW([{"params": _params(), "lr": -1.0}]), "lr")


def test_rejected_param_group_is_not_kept():
    # a group that failed validation must not stay in the optimizer (torch's own
    # optimizers validate before registering); otherwise a later step runs it and a retry
    # with corrected options fails with "parameters appear in more than one group"
    opt = MGUPAdamW(_params())
    extra = torch.nn.Parameter(torch.randn(5))
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [extra], "mask_ratio": 2.0})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [extra], "mask_ratio": 0.25})
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["mask_ratio"] == 0.25


@pytest.mark.parametrize("kw,label", [(dict(ns_steps=0), "ns_steps"), (dict(momentum=1.0), "momentum"),
                                      (dict(momentum=-0.1), "momentum"), (dict(nesterov="yes"), "nesterov")])
def test_muon_specific_options(kw, label):
    _expect(lambda: MGUPMuon(_params(), **kw), label)


# ------------------------------------------------------------------ sparse gradients
@pytest.mark.parametrize("name", ALL)
def test_sparse_gradients_raise_a_clear_error(name):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = mgup_dist.OPTIMIZERS[name](emb.parameters(), lr=1e-2)
    emb(torch.tensor([1, 2, 2])).sum().backward()
    assert emb.weight.grad.is_sparse
    before = emb.weight.detach().clone()
    with pytest.raises(ValueError, match="(?i)sparse"):
        opt.step()
    # and nothing was half-applied
    assert torch.equal(emb.weight.detach(), before)


# ------------------------------------------------------------- Muon on non-matrices
@pytest.mark.parametrize("shape", [(2, 3, 4), (2, 2, 2, 2)])
def test_muon_matrix_group_rejects_higher_dim_params(shape):
    p = torch.nn.Parameter(torch.randn(shape))
    msg = _expect(lambda: MGUPMuon([{"params": [p], "use_muon": True}]), "2-D")
    assert "use_muon" in msg or "adamw" in msg.lower()


@pytest.mark.parametrize("shape", [(5,), ()])
def test_muon_matrix_group_rejects_vectors_and_scalars(shape):
    """A plain 1-D or 0-d param in a use_muon=True group: a ValueError naming 2-D, at
    construction or (for 1-D buffers, which may be flat shards of matrices under ZeRO /
    FSDP1 until a layout says otherwise) at the first step."""
    p = torch.nn.Parameter(torch.randn(shape))

    def build_and_step():
        opt = MGUPMuon([{"params": [p], "use_muon": True}])
        p.grad = torch.randn(shape)
        opt.step()

    _expect(build_and_step, "2-D")


def test_muon_default_grouping_accepts_any_shapes():
    # the default (no use_muon given): non-matrices go to the AdamW fallback, no error
    ps = [torch.nn.Parameter(torch.randn(s)) for s in [(4, 3), (3,), (), (2, 3, 4)]]
    opt = MGUPMuon(ps)
    for p in ps:
        p.grad = torch.randn(p.shape)
    opt.step()
    assert "momentum_buffer" in opt.state[ps[0]]
    assert "exp_avg" in opt.state[ps[3]] and "exp_avg" in opt.state[ps[1]]


def test_fp32_state_and_foreach_must_be_bools():
    _expect(lambda: CMGUPAdamW(_params(), fp32_state="yes"), "fp32_state")
    _expect(lambda: CMGUPAdamW(_params(), foreach="yes"), "foreach")
    _expect(lambda: CMGUPAdamW(_params(), normalize=1), "normalize")
