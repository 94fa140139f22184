"""Every MGUP optimizer against the conventions torch's own optimizers keep (the behaviours
torch's generic optimizer tests check), as a table of option sets x behaviours: tensor lr
of every shape torch accepts, numeric and tensor ``step`` in loaded state, named
parameters, per-group options (``tau`` included), deepcopy/pickle, complex parameters,
foreach vs for-loop, closures, step hooks, ``zero_grad``, ``torch.save`` /
``torch.load(weights_only=True)``, and the ValueErrors where MGUP cannot follow torch.
Tiny float64 tensors: the whole file runs in seconds."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import mgup_dist

ALL = sorted(mgup_dist.OPTIMIZERS)
ADAM_LIKE = [n for n in ALL if "AdamW" in n]
WITH_STEP = [n for n in ALL if "Lion" not in n]  # the AdamW rule (Muon's non-matrix group too) keeps 'step'
NOT_MUON = [n for n in ALL if "Muon" not in n]
F64 = torch.float64

#: option sets every optimizer accepts; each is run through every behaviour below
OPTIONS = {
    "default": {},
    "wd_maximize": {"weight_decay": 0.1, "maximize": True},
    "ratio_normalize": {"mask_ratio": 0.25, "alpha": 1.5, "gamma": 0.75, "normalize": True},
    "tau_shard": {"tau": 0.8, "scope": "shard"},
    "authors": {"convention": "authors", "weight_decay": 0.05},
    "chunked_global": {"chunk_elems": 7, "scope": "global"},
    "loop": {"foreach": False},
    "fp32_state": {"fp32_state": True},
}
TABLE = [(n, o) for n in ALL for o in OPTIONS]


def _params(seed=0, dtype=F64):
    """A matrix and a vector: Muon steps the matrix and runs AdamW on the vector."""
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, 4, generator=g, dtype=dtype)),
            torch.nn.Parameter(torch.randn(4, generator=g, dtype=dtype))]


def _set_grads(ps, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def _make(name, params, **kw):
    kw = dict(kw)
    kw.setdefault("lr", 1e-2)
    return mgup_dist.OPTIMIZERS[name](params, **kw)


def _steps(opt, ps, n, start=0):
    for s in range(start, start + n):
        _set_grads(ps, s)
        opt.step()


def _same(a, b, atol=0.0):
    for p, q in zip(a, b):
        if atol == 0.0:
            assert torch.equal(p, q), (p - q).abs().max()
        else:
            assert torch.allclose(p, q, rtol=0, atol=atol), (p - q).abs().max()


def _options(opt):
    return [{k: v for k, v in g.items() if k not in ("params", "_validated")} for g in opt.param_groups]


# ------------------------------------------------------------------ tensor lr
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0d", "1", "1x1"])
@pytest.mark.parametrize("name", ALL)
def test_tensor_lr_of_every_shape_torch_accepts(name, shape):
    """A one-element CPU lr tensor of shape (), (1,) or (1, 1) steps as the float lr does
    (torch's AdamW accepts all three)."""
    lr = 2.0 ** -6  # exact in every dtype: the tensor and the float lr are the same number
    a, b = _params(), _params()
    _steps(_make(name, a, lr=torch.full(shape, lr, dtype=F64), weight_decay=0.1), a, 3)
    _steps(_make(name, b, lr=lr, weight_decay=0.1), b, 3)
    _same(a, b, atol=1e-15)


@pytest.mark.parametrize("name", ALL)
def test_hyperparameters_are_checked_before_the_params(name):
    """As torch's optimizers: a bad value is a ValueError naming it, whatever the params."""
    for params in (_params(), None):
        with pytest.raises(ValueError, match="lr as a Tensor must be 1-element"):
            _make(name, params, lr=torch.tensor([1e-3, 1e-3]))
        with pytest.raises(ValueError, match="weight_decay"):
            _make(name, params, weight_decay=-1.0)
        with pytest.raises(ValueError, match=r"betas\[0\]"):
            _make(name, params, betas=(1.0, 0.0))


# --------------------------------------------------------------- loaded step
@pytest.mark.parametrize("step", [3, 3.0, "tensor"], ids=["int", "float", "tensor"])
@pytest.mark.parametrize("name", WITH_STEP)
def test_numeric_or_tensor_step_in_loaded_state(name, step):
    """torch turns a numeric 'step' into its float32 0-d counter at load; the continued run
    is the same whichever form the checkpoint holds."""
    a = _params()
    opt = _make(name, a)
    _steps(opt, a, 3)
    sd = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():
        if "step" in st:
            st["step"] = torch.tensor(3.0) if step == "tensor" else step
    loaded = _make(name, [torch.nn.Parameter(p.detach().clone()) for p in a])
    b = [p for g in loaded.param_groups for p in g["params"]]
    loaded.load_state_dict(sd)
    for p in b:
        st = loaded.state[p]
        if "step" in st:
            assert torch.is_tensor(st["step"]) and st["step"].dtype == torch.float32 and st["step"].ndim == 0
            assert st["step"].item() == 3.0
    a_ordered = [p for g in opt.param_groups for p in g["params"]]
    _steps(opt, a_ordered, 2, start=3)
    _steps(loaded, b, 2, start=3)
    _same(a_ordered, b)
    assert all(loaded.state[p]["step"].item() == 5.0 for p in b if "step" in loaded.state[p])


def test_torch_adamw_state_dict_with_an_int_step_continues():
    a = _params()
    adam = torch.optim.AdamW(a, lr=1e-2)
    _steps(adam, a, 2)
    sd = copy.deepcopy(adam.state_dict())
    for st in sd["state"].values():
        st["step"] = int(st["step"].item())
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    mgup = mgup_dist.MGUPAdamW(b, lr=1e-2, alpha=1.0, gamma=1.0)
    with pytest.warns(UserWarning, match="non-MGUP"):
        mgup.load_state_dict(sd)
    _steps(adam, a, 2, start=2)
    _steps(mgup, b, 2, start=2)
    _same(a, b, atol=1e-14)
    assert mgup.state[b[0]]["step"].item() == 4.0


# ------------------------------------------------------------- named params
@pytest.mark.parametrize("name", ALL)
def test_named_parameters_show_their_names_in_state_dict(name):
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 3)).double()
    opt = mgup_dist.OPTIMIZERS[name](model.named_parameters(), lr=1e-2)
    ref = mgup_dist.OPTIMIZERS[name](copy.deepcopy(model).parameters(), lr=1e-2)
    names = dict((id(p), n) for n, p in model.named_parameters())
    sd = opt.state_dict()
    for g_sd, g in zip(sd["param_groups"], opt.param_groups):
        assert g_sd["param_names"] == [names[id(p)] for p in g["params"]]
    assert sorted(n for g in sd["param_groups"] for n in g["param_names"]) == sorted(names.values())
    # named params step as unnamed ones do
    ps = [p for g in opt.param_groups for p in g["params"]]
    qs = [p for g in ref.param_groups for p in g["params"]]
    for s in range(2):
        _set_grads(ps, s)
        _set_grads(qs, s)
        opt.step()
        ref.step()
    _same(ps, qs)
    # and a named state dict loads back into a named optimizer
    again = mgup_dist.OPTIMIZERS[name](model.named_parameters(), lr=1e-2)
    again.load_state_dict(opt.state_dict())
    assert again.state_dict()["param_groups"][0]["param_names"] == sd["param_groups"][0]["param_names"]


@pytest.mark.parametrize("name", ALL)
def test_a_bare_tensor_is_not_a_params_list(name):
    with pytest.raises(TypeError, match="iterable of Tensors"):
        mgup_dist.OPTIMIZERS[name](torch.randn(3, 4))


# ------------------------------------------------------------ per-group options
@pytest.mark.parametrize("name", NOT_MUON)
def test_per_group_options_including_tau(name):
    """A group's own tau gives that group alpha = 1/tau, gamma = tau; the other groups keep
    the defaults; each group steps as an optimizer of its own options would."""
    a, b = _params()
    opt = _make(name, [{"params": [a], "tau": 0.7}, {"params": [b], "mask_ratio": 0.25, "alpha": 1.5, "gamma": 0.75}],
                weight_decay=0.1)
    g0, g1 = opt.param_groups
    assert g0["alpha"] == pytest.approx(1 / 0.7) and g0["gamma"] == 0.7 and g0["mask_ratio"] == 0.5
    assert (g1["alpha"], g1["gamma"], g1["mask_ratio"]) == (1.5, 0.75, 0.25)
    a2, b2 = _params()
    sep = [_make(name, [a2], tau=0.7, weight_decay=0.1),
           _make(name, [b2], mask_ratio=0.25, alpha=1.5, gamma=0.75, weight_decay=0.1)]
    for s in range(3):
        _set_grads([a, b], s)
        _set_grads([a2, b2], s)
        opt.step()
        for o in sep:
            o.step()
    _same([a, b], [a2, b2])
    # added later, too
    c = torch.nn.Parameter(torch.randn(6, dtype=F64))
    opt.add_param_group({"params": [c], "tau": 0.9})
    assert opt.param_groups[-1]["alpha"] == pytest.approx(1 / 0.9) and opt.param_groups[-1]["gamma"] == 0.9


def test_tau_set_on_a_group_after_construction_gives_its_alpha_and_gamma():
    a = _params()
    opt = mgup_dist.MGUPAdamW(a)
    opt.param_groups[0]["tau"] = 0.8
    _steps(opt, a, 1)
    g = opt.param_groups[0]
    assert (g["alpha"], g["gamma"], g["tau"]) == (pytest.approx(1.25), 0.8, None)
    g["tau"], g["alpha"] = 0.5, 3.0  # both changed: which one is meant is unclear
    with pytest.raises(ValueError, match="either tau or alpha/gamma"):
        _steps(opt, a, 1)


@pytest.mark.parametrize("name", ["MGUPMuon", "CMGUPMuon"])
def test_muon_per_group_tau(name):
    w, v = _params()
    opt = _make(name, [{"params": [w], "tau": 0.6}, {"params": [v]}])
    assert opt.param_groups[0]["use_muon"] and not opt.param_groups[1]["use_muon"]
    assert opt.param_groups[0]["alpha"] == pytest.approx(1 / 0.6) and opt.param_groups[0]["gamma"] == 0.6
    assert (opt.param_groups[1]["alpha"], opt.param_groups[1]["gamma"]) == (2.0, 0.5)


@pytest.mark.parametrize("extra", [{"alpha": 1.2}, {"gamma": 0.3}])
def test_tau_with_alpha_or_gamma_in_the_same_group_is_refused(extra):
    a, b = _params()
    with pytest.raises(ValueError, match="either tau or alpha/gamma"):
        mgup_dist.MGUPAdamW([{"params": [a]}, {"params": [b], "tau": 0.7, **extra}])
    with pytest.raises(ValueError, match="either tau or alpha/gamma"):
        mgup_dist.MGUPAdamW([a], tau=0.7, **extra)


# ------------------------------------------------------------- deepcopy/pickle
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name,option", TABLE)
def test_copies_keep_every_option_and_continue_identically(name, option, how):
    kw = OPTIONS[option]
    a = _params()
    opt = _make(name, a, **kw)
    _steps(opt, a, 2)
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert _options(twin) == _options(opt)
    assert twin.fp32_state == opt.fp32_state and type(twin) is type(opt)
    mine = [p for g in opt.param_groups for p in g["params"]]
    theirs = [p for g in twin.param_groups for p in g["params"]]
    _steps(opt, mine, 2, start=2)
    _steps(twin, theirs, 2, start=2)
    _same(mine, theirs)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", ALL)
def test_copy_gives_new_bf16_params_fp32_state(name, how):
    p = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.bfloat16))
    opt = mgup_dist.OPTIMIZERS[name]([p], fp32_state=True)
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    q = torch.nn.Parameter(torch.randn(6, dtype=torch.bfloat16))
    twin.add_param_group({"params": [q]})
    q.grad = torch.randn_like(q)
    twin.step()
    assert {v.dtype for k, v in twin.state[q].items() if k != "step"} == {torch.float32}


# ---------------------------------------------------------------- complex params
def test_complex_param_with_alpha_gamma_one_is_torch_adamw():
    torch.manual_seed(0)
    z = torch.randn(6, 5, dtype=torch.complex64)
    p, q = torch.nn.Parameter(z.clone()), torch.nn.Parameter(z.clone())
    mgup = mgup_dist.MGUPAdamW([p], lr=1e-2, weight_decay=0.1, alpha=1.0, gamma=1.0)
    adam = torch.optim.AdamW([q], lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(6, 5, dtype=torch.complex64)
        p.grad, q.grad = g.clone(), g.clone()
        mgup.step()
        adam.step()
    assert mgup.state[p]["exp_avg"].dtype == torch.complex64  # state stays complex, as torch's
    assert torch.allclose(p, q, rtol=0, atol=1e-6), (p - q).abs().max()


@pytest.mark.parametrize("name", NOT_MUON)
def test_complex_param_is_stepped_as_its_real_view(name):
    """The score of a complex coordinate lives on its real view: a complex param steps
    exactly as the real [..., 2] tensor of its real and imaginary parts does."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(5, 4, dtype=torch.complex128, generator=g)
    p = torch.nn.Parameter(z.clone())
    r = torch.nn.Parameter(torch.view_as_real(z).clone())
    oc, orl = _make(name, [p], weight_decay=0.1, mask_ratio=0.3), _make(name, [r], weight_decay=0.1, mask_ratio=0.3)
    for _ in range(3):
        grad = torch.randn(5, 4, dtype=torch.complex128, generator=g)
        p.grad, r.grad = grad.clone(), torch.view_as_real(grad).clone()
        oc.step()
        orl.step()
    assert torch.equal(torch.view_as_real(p.detach()), r.detach())
    # and its state round-trips like a real param's
    again = _make(name, [torch.nn.Parameter(p.detach().clone())])
    again.load_state_dict(oc.state_dict())


@pytest.mark.parametrize("name", ["MGUPMuon", "CMGUPMuon"])
def test_complex_matrix_in_a_muon_group_is_refused(name):
    with pytest.raises(ValueError, match="complex"):
        _make(name, [torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))])


@pytest.mark.parametrize("name", ALL)
def test_integer_params_are_refused_at_construction(name):
    with pytest.raises(ValueError, match="torch.int64"):
        _make(name, [torch.zeros(4, 3, dtype=torch.int64)])
    opt = _make(name, _params())
    with pytest.raises(ValueError, match="torch.int64"):
        opt.add_param_group({"params": [torch.zeros(3, dtype=torch.int64)]})
    assert len(opt.param_groups) == (2 if "Muon" in name else 1)  # the rejected group is not kept


@pytest.mark.parametrize("name", ALL)
def test_triton_backend_with_cpu_params_is_refused(name):
    with pytest.raises(ValueError, match="backend='triton'.*CPU"):
        _make(name, _params(), backend="triton")
    opt = _make(name, _params())
    opt.param_groups[0]["backend"] = "triton"  # changed after construction: refused at the step
    _set_grads([p for g in opt.param_groups for p in g["params"]], 0)
    with pytest.raises(ValueError, match="backend='triton'.*CPU"):
        opt.step()


# ------------------------------------------------------------- foreach vs loop
@pytest.mark.parametrize("name,option", [(n, o) for n, o in TABLE if o != "loop"])
def test_foreach_and_for_loop_agree(name, option):
    a, b = _params(), _params()
    _steps(_make(name, a, **OPTIONS[option], foreach=True), a, 3)
    _steps(_make(name, b, **OPTIONS[option], foreach=False), b, 3)
    _same(a, b, atol=1e-14)


# ----------------------------------------------------- closures, hooks, zero_grad
@pytest.mark.parametrize("name", ALL)
def test_closure_hooks_and_zero_grad(name):
    a = _params()
    opt = _make(name, a)
    seen = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", o is opt)))
    post = opt.register_step_post_hook(lambda o, args, kwargs: seen.append(("post", o is opt)))

    def closure():
        seen.append(("closure", torch.is_grad_enabled()))
        opt.zero_grad()
        loss = sum((p * p).sum() for p in a)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert seen == [("pre", True), ("closure", True), ("post", True)]
    assert torch.is_tensor(loss) and loss.requires_grad
    pre.remove()
    post.remove()
    _steps(opt, a, 1)
    assert len(seen) == 3  # removed hooks are not called
    opt.zero_grad()
    assert all(p.grad is None for p in a)
    _set_grads(a, 0)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in a)


# ------------------------------------------------ torch.save / load(weights_only)
@pytest.mark.parametrize("name,option", TABLE)
def test_state_dict_round_trip_through_weights_only_load(name, option):
    kw = OPTIONS[option]
    a = _params()
    opt = _make(name, a, **kw)
    _steps(opt, a, 2)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    fresh = _make(name, b, **kw)
    fresh.load_state_dict(sd)
    assert _options(fresh) == _options(opt)
    mine = [p for g in opt.param_groups for p in g["params"]]
    theirs = [p for g in fresh.param_groups for p in g["params"]]
    _steps(opt, mine, 2, start=2)
    _steps(fresh, theirs, 2, start=2)
    _same(mine, theirs)


# --------------------------------------------------- loaded state that does not fit
def _stepped_state(name, shape=(4, 5)):
    p = torch.nn.Parameter(torch.randn(*shape, dtype=F64))
    opt = _make(name, [{"params": [p], "use_muon": False}] if "Muon" in name else [p])
    p.grad = torch.randn_like(p)
    opt.step()
    return opt.state_dict()


def _target(name, shape):
    q = torch.nn.Parameter(torch.randn(*shape, dtype=F64))
    return _make(name, [{"params": [q], "use_muon": False}] if "Muon" in name else [q])


@pytest.mark.parametrize("shape", [(3, 3), (5, 5), (5, 4)], ids=["fewer", "more", "transposed"])
@pytest.mark.parametrize("name", ALL)
def test_loaded_state_of_another_shape_is_refused(name, shape):
    sd = _stepped_state(name)
    with pytest.raises(ValueError, match=r"param group 0, parameter 0 .*shape \(4, 5\)"):
        _target(name, shape).load_state_dict(sd)


@pytest.mark.parametrize("name", ALL)
def test_loaded_state_without_a_required_key_or_of_an_integer_dtype_is_refused(name):
    sd = _stepped_state(name)
    key = "exp_avg_sq" if name in WITH_STEP else "exp_avg"
    if name in WITH_STEP:  # (Lion's state without exp_avg is empty: a param not stepped yet)
        broken = copy.deepcopy(sd)
        del broken["state"][0][key]
        with pytest.raises(ValueError, match=f"param group 0, parameter 0 lacks .*{key}"):
            _target(name, (4, 5)).load_state_dict(broken)
    broken = copy.deepcopy(sd)
    broken["state"][0][key] = broken["state"][0][key].long()
    with pytest.raises(ValueError, match=f"'{key}' of param group 0, parameter 0 is torch.int64"):
        _target(name, (4, 5)).load_state_dict(broken)


def test_flat_state_of_the_same_size_still_loads():
    """Flat-shard loaders hand 1-D state of the param's size: the step reads state flat."""
    sd = _stepped_state("MGUPAdamW")
    flat = copy.deepcopy(sd)
    for k in ("exp_avg", "exp_avg_sq"):
        flat["state"][0][k] = flat["state"][0][k].reshape(-1)
    a, b = _target("MGUPAdamW", (4, 5)), _target("MGUPAdamW", (4, 5))
    a.load_state_dict(sd)
    b.load_state_dict(flat)


# --------------------------------------------------- what MGUP cannot follow
@pytest.mark.parametrize("kw,says", [({"differentiable": True}, "differentiable"), ({"fused": True}, "fused"),
                                     ({"amsgrad": True}, "AMSGrad")])
@pytest.mark.parametrize("name", ADAM_LIKE)
def test_torch_options_mgup_cannot_honour_say_so(name, kw, says):
    with pytest.raises(ValueError, match=says):
        _make(name, _params(), **kw)
