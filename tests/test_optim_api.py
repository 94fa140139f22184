"""The optimizers behave as torch users expect: state_dict round trip, closures,
zero_grad, param groups, schedulers, dtypes, edge cases (empty tensors, mask_ratio 0 / 1)."""
from __future__ import annotations

import copy
import io

import pytest
import torch

import mgup_dist
from mgup_dist import CMGUPAdamW, MGUPAdamW, MGUPLion, MGUPMuon

ALL = sorted(mgup_dist.OPTIMIZERS)
F64 = torch.float64


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)


def _loss(model, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 6, generator=gen, dtype=next(model.parameters()).dtype)
    y = torch.randn(16, 3, generator=gen, dtype=x.dtype)
    return torch.nn.functional.mse_loss(model(x), y)


def _train(model, opt, seeds):
    for s in seeds:
        opt.zero_grad()
        _loss(model, s).backward()
        opt.step()


# ----------------------------------------------------------------------- registry
def test_registry_and_defaults():
    assert set(mgup_dist.OPTIMIZERS) == {"MGUPAdamW", "CMGUPAdamW", "MGUPLion", "CMGUPLion", "MGUPMuon", "CMGUPMuon"}
    for name, cls in mgup_dist.OPTIMIZERS.items():
        assert cls.__name__ == name and issubclass(cls, torch.optim.Optimizer)
        g = cls(_model().parameters()).param_groups[0]
        assert g["mode"] == ("cautious" if name.startswith("C") else "topk")
        assert (g["mask_ratio"], g["alpha"], g["gamma"], g["scope"], g["normalize"]) == (0.5, 2.0, 0.5, "tensor", False)
    g = MGUPAdamW(_model().parameters(), tau=0.8).param_groups[0]
    assert g["alpha"] == pytest.approx(1.25) and g["gamma"] == pytest.approx(0.8)


# --------------------------------------------------------------------- state names
def test_state_names_and_dtypes_after_first_step():
    model = _model()
    w1, b1, w2, b2 = model.parameters()
    cases = {
        MGUPAdamW: {id(w1): {"step", "exp_avg", "exp_avg_sq"}, id(b1): {"step", "exp_avg", "exp_avg_sq"}},
        MGUPLion: {id(w1): {"exp_avg"}, id(b1): {"exp_avg"}},
        MGUPMuon: {id(w1): {"momentum_buffer"}, id(b1): {"step", "exp_avg", "exp_avg_sq"}},
    }
    for cls, expected in cases.items():
        opt = cls(model.parameters())
        _train(model, opt, [0])
        for p in (w1, b1):
            st = opt.state[p]
            assert set(st) == expected[id(p)], (cls.__name__, set(st))
            for k, v in st.items():
                if k == "step":
                    assert v.dtype == torch.float32 and v.ndim == 0 and v.item() == 1.0
                else:
                    assert v.shape == p.shape and v.dtype == p.dtype, (cls.__name__, k)


# ------------------------------------------------------------- state_dict round trip
@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip_continues_identically(name):
    cls = mgup_dist.OPTIMIZERS[name]
    model = _model()
    opt = cls(model.parameters(), lr=1e-2)
    _train(model, opt, [0, 1, 2])

    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    clone = copy.deepcopy(model)
    opt2 = cls(clone.parameters(), lr=1e-2)
    opt2.load_state_dict(saved)
    _train(model, opt, [3, 4])
    _train(clone, opt2, [3, 4])
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b), name
    for a, b in zip(model.parameters(), clone.parameters()):
        for k in opt.state[a]:
            assert torch.equal(opt.state[a][k], opt2.state[b][k]), (name, k)


def test_load_state_dict_restores_group_options():
    model = _model()
    opt = MGUPAdamW(model.parameters(), mask_ratio=0.25, tau=0.8, mode="cautious", normalize=True)
    _train(model, opt, [0])
    opt2 = MGUPAdamW(_model().parameters())
    opt2.load_state_dict(opt.state_dict())
    g = opt2.param_groups[0]
    assert (g["mask_ratio"], g["mode"], g["normalize"]) == (0.25, "cautious", True)
    assert g["alpha"] == pytest.approx(1.25) and g["gamma"] == pytest.approx(0.8)


# ------------------------------------------------------------------------ closures
@pytest.mark.parametrize("name", ALL)
def test_step_with_closure_returns_loss_and_uses_its_gradients(name):
    cls = mgup_dist.OPTIMIZERS[name]
    model = _model()
    ref_model = copy.deepcopy(model)
    opt = cls(model.parameters(), lr=1e-2)
    ref_opt = cls(ref_model.parameters(), lr=1e-2)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = _loss(model, 0)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == [True]  # called once, with autograd on although step() is no_grad
    assert isinstance(loss, torch.Tensor) and loss.item() == pytest.approx(_loss(ref_model, 0).item())
    _train(ref_model, ref_opt, [0])
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------- zero_grad
@pytest.mark.parametrize("name", ALL)
def test_zero_grad_and_params_without_grad_are_skipped(name):
    cls = mgup_dist.OPTIMIZERS[name]
    model = _model()
    opt = cls(model.parameters(), lr=1e-2)
    _train(model, opt, [0])
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())  # set_to_none, torch's default
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # no gradients at all: nothing moves
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    # only the last layer gets a gradient: the first layer keeps its values and its state
    w1 = next(model.parameters())
    state_before = {k: v.clone() for k, v in opt.state[w1].items()}
    _loss(model, 1).backward()
    w1.grad = None
    opt.step()
    assert torch.equal(w1, before[0])
    for k, v in state_before.items():
        assert torch.equal(opt.state[w1][k], v), k
    assert not torch.equal(list(model.parameters())[-1], before[-1])


def test_zero_grad_set_to_none_false_zeroes_in_place():
    model = _model()
    opt = CMGUPAdamW(model.parameters())
    _loss(model, 0).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


# -------------------------------------------------------------------- param groups
@pytest.mark.parametrize("rule", ["adamw", "lion"])
def test_param_groups_behave_like_separate_optimizers(rule):
    """Selection is per tensor (scope='tensor'), so two groups with their own options
    step exactly like two optimizers with those options."""
    cls = MGUPAdamW if rule == "adamw" else MGUPLion
    model = _model(dtype=F64)
    w1, b1, w2, b2 = model.parameters()
    g0 = dict(lr=1e-2, mask_ratio=0.25, alpha=1.5, gamma=0.75)
    g1 = dict(lr=3e-3, mask_ratio=0.75, mode="cautious", normalize=True, weight_decay=0.2)
    opt = cls([dict(params=[w1, b1], **g0), dict(params=[w2, b2], **g1)])
    clone = copy.deepcopy(model)
    c1, cb1, c2, cb2 = clone.parameters()
    sep = [cls([c1, cb1], **g0), cls([c2, cb2], **g1)]
    for s in range(3):
        opt.zero_grad()
        _loss(model, s).backward()
        opt.step()
        for o in sep:
            o.zero_grad()
        _loss(clone, s).backward()
        for o in sep:
            o.step()
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def test_add_param_group_later_gets_defaults_and_state():
    a = torch.nn.Parameter(torch.randn(4, 4))
    b = torch.nn.Parameter(torch.randn(7))
    opt = MGUPAdamW([a], lr=1e-2, mask_ratio=0.3)
    opt.add_param_group({"params": [b], "lr": 1e-3})
    assert opt.param_groups[1]["mask_ratio"] == 0.3 and opt.param_groups[1]["lr"] == 1e-3
    a.grad, b.grad = torch.randn(4, 4), torch.randn(7)
    b0 = b.detach().clone()
    opt.step()
    assert set(opt.state[b]) == {"step", "exp_avg", "exp_avg_sq"}
    # first AdamW step moves each coordinate by lr * phi (|u| = 1 up to eps) plus decay
    moved = (b0 * (1 - 1e-3 * 1e-2) - b.detach()).abs()
    assert torch.allclose(moved.sort().values, torch.tensor([0.5e-3] * 5 + [2e-3] * 2), rtol=1e-4)


def test_lr_scheduler_changes_the_step():
    p = torch.nn.Parameter(torch.zeros(10, dtype=F64))
    opt = MGUPLion([p], lr=1.0, weight_decay=0.0, mask_ratio=0.0, gamma=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    p.grad = torch.ones(10, dtype=F64)
    opt.step()
    sched.step()
    assert torch.allclose(p.detach(), torch.full((10,), -0.5, dtype=F64))
    opt.step()
    assert torch.allclose(p.detach(), torch.full((10,), -0.55, dtype=F64))


# ------------------------------------------------------------ mask_ratio 0 and 1
@pytest.mark.parametrize("ratio,scale", [(0.0, 0.5), (1.0, 2.0)])
@pytest.mark.parametrize("foreach", [False, True])
def test_mask_ratio_edges_are_adamw_with_scaled_lr(ratio, scale, foreach):
    """K = 0: every coordinate gets gamma; K = N: every coordinate gets alpha.  Without
    weight decay that is AdamW with lr * gamma (resp. lr * alpha)."""
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=gen, dtype=F64) for s in [(5, 4), (3,), ()]]
    qs = [p.clone() for p in ps]
    opt = MGUPAdamW(ps, lr=1e-2, weight_decay=0.0, mask_ratio=ratio, alpha=2.0, gamma=0.5, foreach=foreach)
    ref = torch.optim.AdamW(qs, lr=1e-2 * scale, weight_decay=0.0, foreach=False)
    for _ in range(4):
        for p, q in zip(ps, qs):
            g = torch.randn(p.shape, generator=gen, dtype=F64)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, q in zip(ps, qs):
        assert (p - q).abs().max().item() < 1e-12


# --------------------------------------------------------------------- empty tensors
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("foreach", [False, True])
def test_empty_tensors_are_skipped(name, foreach):
    cls = mgup_dist.OPTIMIZERS[name]
    gen = torch.Generator().manual_seed(1)
    shapes = [(0,), (0, 4), (3, 4), (4,)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps[2:]]
    opt = cls(ps, lr=1e-2, foreach=foreach)
    opt_ref = cls(ref, lr=1e-2, foreach=foreach)
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        for p, r in zip(ps[2:], ref):
            r.grad = p.grad.clone()
        opt.step()
        opt_ref.step()
    assert ps[0].shape == (0,) and ps[1].shape == (0, 4)
    # the non-empty params step exactly as without the empty ones
    for p, r in zip(ps[2:], ref):
        assert torch.equal(p, r)


# ------------------------------------------------------------------ dtypes / state
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_state_option(name, dtype):
    cls = mgup_dist.OPTIMIZERS[name]
    model = _model(dtype=dtype)
    for fp32_state, want in ((False, dtype), (True, torch.float32)):
        opt = cls(model.parameters(), lr=1e-3, fp32_state=fp32_state)
        _train(model, opt, [0])
        for p in model.parameters():
            assert p.dtype == dtype
            for k, v in opt.state[p].items():
                if k != "step":
                    assert v.dtype == want, (name, k, v.dtype)


def test_bf16_with_fp32_state_round_trips_through_state_dict():
    model = _model(dtype=torch.bfloat16)
    opt = MGUPAdamW(model.parameters(), fp32_state=True)
    _train(model, opt, [0, 1])
    clone = copy.deepcopy(model)
    opt2 = MGUPAdamW(clone.parameters(), fp32_state=True)
    opt2.load_state_dict(opt.state_dict())
    for p in clone.parameters():
        # torch casts loaded state to the param dtype unless the optimizer keeps it fp32
        assert opt2.state[p]["exp_avg"].dtype == torch.float32
    _train(model, opt, [2])
    _train(clone, opt2, [2])
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ error surfaces
def test_sparse_gradient_error_names_sparse():
    emb = torch.nn.Embedding(8, 3, sparse=True)
    opt = MGUPAdamW(emb.parameters())
    emb(torch.tensor([0, 5])).sum().backward()
    with pytest.raises(ValueError, match="(?i)sparse"):
        opt.step()
    with pytest.raises(RuntimeError, match="(?i)sparse"):  # also what torch's optimizers raise
        opt.step()


def test_muon_non_matrix_in_matrix_group_error():
    p = torch.nn.Parameter(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="2-D"):
        MGUPMuon([{"params": [p], "use_muon": True}])


def test_layout_of_default_is_whole_tensor_with_running_ids():
    a, b, c = (torch.nn.Parameter(torch.randn(s)) for s in [(3, 4), (5,), (2,)])
    opt = MGUPAdamW([{"params": [a, b]}, {"params": [c]}])
    lays = [opt.layout_of(p) for p in (a, b, c)]
    assert [l.segments[0].tensor_id for l in lays] == [0, 1, 2]
    assert all(l.covers_whole_buffer for l in lays)
    assert lays[0].segments[0].global_shape == (3, 4)
