"""Every fast path of every optimizer against the line-by-line reference, in float64.

``mgup_dist.reference`` is written independently of ``functional`` / ``selection`` /
``optim``.  Both are driven with the same random gradients for several steps, and the
parameters (and states) must agree.

Why a tolerance and not ``torch.equal``: the reference computes the AdamW direction as
``m_hat / (sqrt(v_hat) + eps)`` and the step as ``p - lr * phi * u``, the fast path as
``(m / (sqrt(v / bc2) + eps)) / bc1`` and ``p.addcmul_(u, phi, value=-lr)``; Muon's
``0.2 * sqrt(max(A, B))`` is folded into the update there and into the learning rate
here.  Those are the same reals rounded in a different order: results differ in the last
bits (float64: ~1e-16 relative).  The tolerance 1e-12 is ~10^4 ulp of O(1) values and
~10^9 times smaller than any difference a wrong selection makes (``lr * (alpha - gamma) *
|u|`` >= 1e-4 here), so a single coordinate that gets alpha instead of gamma, a wrong tie
break, a wrong K or a wrong normalisation fails the test.  Exact ties stay exact ties in
both implementations (equal inputs through equal elementwise ops), so tie-breaking is
tested for real: the "tied" tensor has duplicated columns and rows whose gradient is zero
after the first step, which gives scores +0.0 and -0.0 with non-zero updates.
"""
from __future__ import annotations

import pytest
import torch

import mgup_dist
from mgup_dist import reference as R

TOL = 1e-12

# name -> (shape, kind); kind shapes the gradient stream
SHAPES = [
    ("scalar", (), "randn"),
    ("one", (1,), "randn"),
    ("vec", (7,), "randn"),
    ("tall", (9, 4), "randn"),
    ("wide", (3, 8), "randn"),
    ("tied", (6, 5), "tied"),
    ("nan", (4, 6), "nan"),
    ("empty", (0, 3), "randn"),
]
STEPS = 4


def _grads(shape, kind, step, gen):
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "tied":
        g[:, 1] = g[:, 0]  # duplicated columns: identical histories, identical scores
        g[:, 3] = g[:, 0]
        if step == 0:
            # signs of the first gradient fix the signs of u on rows 0 and 3 for the next
            # steps: row 0 (lower flat indices) will score -0.0, row 3 +0.0, so a rule that
            # ranked +0.0 above -0.0 would pick differently from "lower index wins"
            g[0] = -g[0].abs()
            g[3] = g[3].abs()
        else:
            g[0] = 0.0  # zero-gradient rows: scores +-0.0 while the update is non-zero
            g[3] = 0.0
    elif kind == "nan":
        g[1, 2] = float("nan")  # score NaN: ranks lowest, never "aligned"
        g[3, 0] = float("nan")
    return g


def _make_params(seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for _, shape, _ in SHAPES]


def _assert_close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = TOL):
    assert a.shape == b.shape, (what, a.shape, b.shape)
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    assert torch.equal(nan_a, nan_b), f"{what}: NaN positions differ"
    if a.numel():
        diff = (a - b).abs()[~nan_a]
        worst = diff.max().item() if diff.numel() else 0.0
        assert worst <= tol, f"{what}: max abs diff {worst:.3e} > {tol:g}"


# ----------------------------------------------------------------------------- cases
TOPK_RATIOS = [0.0, 0.3, 0.5, 1.0]
CASES = []
for rule in ("adamw", "lion", "muon"):
    for normalize in (False, True):
        for r in TOPK_RATIOS:
            CASES.append((rule, "topk", r, normalize))
        CASES.append((rule, "cautious", 0.5, normalize))

# Scales: the paper's tau = 0.5 for top-K; Cautious (alpha 1, gamma 0) for cautious mode,
# where normalize=True is exactly Liang et al.'s optimizer.
SCALES = {"topk": dict(alpha=2.0, gamma=0.5), "cautious": dict(alpha=1.0, gamma=0.0)}
HP = {
    "adamw": dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1),
    "lion": dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1),
    # Newton-Schulz in the params' float64 (the default, bfloat16 as torch.optim.Muon, is
    # compared with the matrix-by-matrix form in test_muon_batched.py)
    "muon": dict(lr=2e-2, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8,
                 ns_dtype="param"),
}


def _fast(rule, params, mode, r, normalize, foreach, **extra):
    """The optimizer under test, with the reference's hyperparameters."""
    kw = dict(HP[rule], mode=mode, mask_ratio=r, normalize=normalize, foreach=foreach, **SCALES[mode], **extra)
    cls = {"adamw": mgup_dist.MGUPAdamW, "lion": mgup_dist.MGUPLion, "muon": mgup_dist.MGUPMuon}[rule]
    return cls(params, **kw)


def _reference_step(rule, p, g, state, mode, r, normalize, hp=None):
    hp = dict(HP[rule]) if hp is None else hp
    opts = dict(mode=mode, mask_ratio=r, normalize=normalize, **SCALES[mode])
    if rule == "adamw" or (rule == "muon" and p.ndim != 2):
        # Muon's fallback for non-matrices: MGUP-AdamW with Muon's betas / eps / lr / wd
        b1, b2 = hp["betas"]
        return R.adamw_step(p, g, state, lr=hp["lr"], beta1=b1, beta2=b2, eps=hp["eps"],
                            weight_decay=hp["weight_decay"], **opts)
    if rule == "lion":
        b1, b2 = hp["betas"]
        return R.lion_step(p, g, state, lr=hp["lr"], beta1=b1, beta2=b2, weight_decay=hp["weight_decay"], **opts)
    return R.muon_step(p, g, state, lr=hp["lr"], momentum=hp["momentum"], nesterov=hp["nesterov"],
                       ns_steps=hp["ns_steps"], weight_decay=hp["weight_decay"], **opts)


def _case_id(c):
    rule, mode, r, normalize = c
    return f"{rule}-{mode}{'' if mode == 'cautious' else f'-r{r}'}{'-norm' if normalize else ''}"


# "loop" / "foreach": the eager CPU backend (introselect); "compile": its phases fused by
# Inductor (the first compile costs ~20-30 s a kernel per process, cached on disk through
# TORCHINDUCTOR_CACHE_DIR, set by conftest.py); "torch-ops*": the device-agnostic backend.
PATHS = {"loop": dict(foreach=False), "foreach": dict(foreach=True), "compile": dict(foreach=True, compile=True),
         # the device-agnostic backend (NPU and others): radix select in torch ops, no host reads
         "torch-ops": dict(foreach=True, backend="torch"), "torch-ops-loop": dict(foreach=False, backend="torch")}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_fast_path_matches_reference(case, path):
    rule, mode, r, normalize = case
    fast_params = _make_params()
    ref_params = [p.clone() for p in fast_params]
    opt = _fast(rule, fast_params, mode, r, normalize, **PATHS[path])
    ref_states = [dict() for _ in ref_params]
    gen = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        for i, (_, shape, kind) in enumerate(SHAPES):
            g = _grads(shape, kind, step, gen)
            fast_params[i].grad = g.clone()
            _reference_step(rule, ref_params[i], g, ref_states[i], mode, r, normalize)
        opt.step()
        for i, (name, _, _) in enumerate(SHAPES):
            _assert_close(fast_params[i], ref_params[i], f"step {step + 1}, param {name!r}")
    # the state too, under torch's names
    for i, (name, _, _) in enumerate(SHAPES):
        st = opt.state[fast_params[i]]
        for key, ref in ref_states[i].items():
            if key == "step":
                assert float(st["step"]) == float(ref), (name, key)
            else:
                _assert_close(st[key], ref, f"state {key!r} of {name!r}")


def test_cases_cover_every_rule_mode_and_edge_ratio():
    # guards the parametrisation above against silent shrinking
    assert {c[0] for c in CASES} == {"adamw", "lion", "muon"}
    assert {c[1] for c in CASES} == {"topk", "cautious"}
    assert {0.0, 1.0} <= {c[2] for c in CASES if c[1] == "topk"}
    assert {True, False} == {c[3] for c in CASES}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rule", ["adamw", "lion", "muon"])
def test_foreach_and_loop_paths_agree_exactly(rule):
    """The module promises the for-loop and foreach paths run the same ops in the same
    order: bit-identical parameters."""
    outs = []
    for foreach in (False, True):
        params = _make_params(seed=3)
        opt = _fast(rule, params, "topk", 0.5, False, foreach)
        gen = torch.Generator().manual_seed(4)
        for step in range(3):
            for p, (_, shape, kind) in zip(params, SHAPES):
                p.grad = _grads(shape, kind, step, gen)
            opt.step()
        outs.append(params)
    for a, b, (name, _, _) in zip(*outs, SHAPES):
        assert torch.equal(torch.nan_to_num(a, nan=7.0), torch.nan_to_num(b, nan=7.0)), name


@pytest.mark.timeout(60)
def test_muon_default_grouping_matches_reference_fallback():
    """A plain param list: 2-D params use Muon, the rest (0-d, 1-D, and params named in
    adamw_params) the AdamW fallback."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(6, 4), (4,), (), (5, 3)]
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    ref = [p.clone() for p in params]
    states = [dict() for _ in params]
    hp = HP["muon"]
    opt = mgup_dist.MGUPMuon(params, adamw_params=[params[3]], mask_ratio=0.5, alpha=2.0, gamma=0.5, **hp)
    for step in range(3):
        for i, s in enumerate(shapes):
            g = torch.randn(s, generator=gen, dtype=torch.float64)
            params[i].grad = g.clone()
            if i == 3:  # listed in adamw_params: AdamW although 2-D
                b1, b2 = hp["betas"]
                R.adamw_step(ref[i], g, states[i], lr=hp["lr"], beta1=b1, beta2=b2, eps=hp["eps"],
                             weight_decay=hp["weight_decay"], mode="topk", mask_ratio=0.5, alpha=2.0, gamma=0.5)
            else:
                _reference_step("muon", ref[i], g, states[i], "topk", 0.5, False)
        opt.step()
    for i in range(len(shapes)):
        _assert_close(params[i], ref[i], f"param {i} shape {shapes[i]}")
    assert "momentum_buffer" in opt.state[params[0]]
    assert set(opt.state[params[3]]) == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.timeout(60)
def test_tau_shorthand_is_alpha_over_tau_gamma_tau():
    gen = torch.Generator().manual_seed(6)
    p1 = torch.randn(10, 10, generator=gen, dtype=torch.float64)
    p2 = p1.clone()
    a = mgup_dist.MGUPAdamW([p1], tau=0.25)
    b = mgup_dist.MGUPAdamW([p2], alpha=4.0, gamma=0.25)
    for _ in range(3):
        g = torch.randn(10, 10, generator=gen, dtype=torch.float64)
        p1.grad, p2.grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert torch.equal(p1, p2)


# ------------------------------------------------------------------ low precision
@pytest.mark.timeout(120)
@pytest.mark.parametrize("fp32_state", [None, True], ids=["state-default", "fp32-state"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize("name", sorted(mgup_dist.OPTIMIZERS))
def test_half_precision_params_run_and_stay_finite(name, foreach, dtype, fp32_state):
    cls = mgup_dist.OPTIMIZERS[name]
    gen = torch.Generator().manual_seed(7)
    shapes = [(16, 8), (8,), (), (1,)]
    params = [(torch.randn(s, generator=gen) * 0.1).to(dtype) for s in shapes]
    start = [p.clone() for p in params]
    # lr 1e-2: large enough that every step is visible at half precision (bf16 ulp at 0.1 ~ 4e-4)
    opt = cls(params, lr=1e-2, foreach=foreach, fp32_state=fp32_state)
    for _ in range(5):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    for p, p0 in zip(params, start):
        assert p.dtype == dtype
        assert torch.isfinite(p.float()).all(), (
            f"{name}: non-finite {tuple(p.shape)} parameter after 5 steps in {dtype} (with fp16 state, "
            "(1-beta2)*g^2 underflows to 0 and eps=1e-8 is below fp16's smallest subnormal, so "
            "m / (sqrt(v) + eps) = m / 0: which is why fp16 params default to fp32 state)"
        )
        assert not torch.equal(p, p0), f"{name}: a {tuple(p.shape)} parameter did not move"
    for p in params:
        for key, val in opt.state[p].items():
            if key != "step" and isinstance(val, torch.Tensor):
                # by default: bf16 state for bf16 params, fp32 state for fp16 params; fp32 on request
                want = torch.float32 if (fp32_state or dtype == torch.float16) else dtype
                assert val.dtype == want, (name, key, val.dtype)
                assert torch.isfinite(val.float()).all(), (name, key)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rule", ["adamw", "lion"])
def test_half_precision_tracks_float64_reference(rule):
    """bf16 params with fp32 state follow the float64 reference to bf16 accuracy."""
    gen = torch.Generator().manual_seed(8)
    p64 = torch.randn(32, 16, generator=gen, dtype=torch.float64)
    pbf = p64.to(torch.bfloat16)
    ref = pbf.double()
    opt = _fast(rule, [pbf], "cautious", 0.5, False, True, fp32_state=True)
    state = {}
    for step in range(3):
        g = torch.randn(32, 16, generator=gen, dtype=torch.float64).to(torch.bfloat16)
        pbf.grad = g
        _reference_step(rule, ref, g.double(), state, "cautious", 0.5, False)
        opt.step()
    # bf16 has 8 significant bits: ~4e-3 relative, a few roundings per step
    assert (pbf.double() - ref).abs().max().item() < 0.05
    assert all(v.dtype == torch.float32 for k, v in opt.state[pbf].items() if k != "step")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
def test_signed_zero_ties_and_nan_rank_as_specified(foreach):
    """Scores built by hand through Lion (u = sign(b1*m + (1-b1)*g), s = u*g):
    step 1 sets m = (1-b2)*g1; at step 2 a coordinate with g2 = 0 has u = sign(g1) != 0
    and s = -0.0 (g1 < 0) or +0.0 (g1 > 0).  Coordinates 0-3 score -0.0, 4-7 score +0.0,
    8-9 score 1, 10 scores NaN; K = floor(0.5 * 11) = 5 must pick 8, 9 (largest), then
    0, 1, 2 (ties: lower flat index, -0.0 == +0.0).  NaN is never picked."""
    g1 = torch.tensor([-1.0] * 4 + [1.0] * 4 + [1.0, 1.0, 1.0], dtype=torch.float64)
    g2 = torch.tensor([0.0] * 8 + [1.0, 1.0, float("nan")], dtype=torch.float64)
    p = torch.zeros(11, dtype=torch.float64)
    opt = mgup_dist.MGUPLion([p], lr=1.0, betas=(0.9, 0.99), weight_decay=0.0, mask_ratio=0.5,
                             alpha=2.0, gamma=0.5, foreach=foreach)
    p.grad = g1.clone()
    opt.step()
    before = p.clone()
    p.grad = g2.clone()
    opt.step()
    step = (before - p)[:10]  # = phi * u with lr = 1
    u = torch.tensor([-1.0] * 4 + [1.0] * 6, dtype=torch.float64)
    phi = step / u
    expected = torch.tensor([2.0, 2.0, 2.0, 0.5, 0.5, 0.5, 0.5, 0.5, 2.0, 2.0], dtype=torch.float64)
    assert torch.equal(phi, expected), phi
    # and the reference agrees
    ref, st = torch.zeros(11, dtype=torch.float64), {}
    for g in (g1, g2):
        phi_ref = R.lion_step(ref, g, st, lr=1.0, beta1=0.9, beta2=0.99, weight_decay=0.0,
                              mode="topk", mask_ratio=0.5, alpha=2.0, gamma=0.5)
    assert torch.equal(phi_ref[:10], expected)
    assert phi_ref[10] == 0.5


@pytest.mark.timeout(60)
@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
def test_muon_without_nesterov_matches_reference(foreach):
    hp = dict(HP["muon"], nesterov=False, weight_decay=0.05)
    gen = torch.Generator().manual_seed(9)
    shapes = [(7, 3), (3, 7), (4, 4)]
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    ref = [p.clone() for p in params]
    states = [dict() for _ in params]
    opt = mgup_dist.MGUPMuon(params, mode="topk", mask_ratio=0.4, alpha=1.5, gamma=0.75, foreach=foreach, **hp)
    for _ in range(3):
        for i, s in enumerate(shapes):
            g = torch.randn(s, generator=gen, dtype=torch.float64)
            params[i].grad = g.clone()
            R.muon_step(ref[i], g, states[i], lr=hp["lr"], momentum=hp["momentum"], nesterov=False,
                        ns_steps=hp["ns_steps"], weight_decay=hp["weight_decay"], mode="topk", mask_ratio=0.4,
                        alpha=1.5, gamma=0.75)
        opt.step()
    for i in range(len(shapes)):
        _assert_close(params[i], ref[i], f"param {shapes[i]}")
        _assert_close(opt.state[params[i]]["momentum_buffer"], states[i]["momentum_buffer"], "momentum_buffer")
