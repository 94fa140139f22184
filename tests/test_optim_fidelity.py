"""Interop and fidelity of the optimizer classes: resuming from torch AdamW checkpoints,
refusing another rule's state, the MGUP authors' formulation (``convention="authors"``)
against an independent re-derivation of their formulas, re-validation of changed values,
non-finite input, mixed dtypes and wrong-shaped gradients."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from mgup_dist import CMGUPAdamW, CMGUPLion, MGUPAdamW, MGUPLion, MGUPMuon

F64 = torch.float64


def _params(seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in [(6, 5), (7,)]]


def _grads(ps, step):
    g = torch.Generator().manual_seed(1000 + step)
    out = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in ps]
    out[0][0] = 0.0  # a zero row: scores exactly 0 (the cautious >= 0 case)
    return out


def _run(opt, ps, steps, start=0):
    for s in range(start, start + steps):
        for p, g in zip(ps, _grads(ps, s)):
            p.grad = g
        opt.step()


# ------------------------------------------------------------ AdamW checkpoints
@pytest.mark.parametrize("cls", [MGUPAdamW, CMGUPAdamW])
def test_resume_from_a_torch_adamw_checkpoint(cls):
    """torch AdamW for 3 steps, its state dict into MGUP (alpha = gamma = 1): the continued
    run equals AdamW continued; the MGUP settings of the new optimizer are kept, with a
    warning that says what came from where."""
    a, b = _params(), _params()
    adam = torch.optim.AdamW(a, lr=1e-2, weight_decay=0.1)
    _run(adam, a, 3)
    with torch.no_grad():
        for p, q in zip(b, a):
            p.copy_(q)
    mgup = cls(b, lr=5e-2, weight_decay=0.0, alpha=1.0, gamma=1.0, mask_ratio=0.3)
    with pytest.warns(UserWarning, match="non-MGUP optimizer"):
        mgup.load_state_dict(copy.deepcopy(adam.state_dict()))  # as through torch.save: not adam's live tensors
    g = mgup.param_groups[0]
    assert (g["mask_ratio"], g["alpha"], g["gamma"], g["mode"]) == (0.3, 1.0, 1.0, cls(b).defaults["mode"])
    assert g["lr"] == 1e-2 and g["weight_decay"] == 0.1  # torch's hyperparameters come with the checkpoint
    _run(adam, a, 4, start=3)
    _run(mgup, b, 4, start=3)
    for p, q in zip(a, b):
        assert torch.allclose(p, q, rtol=0, atol=1e-13), (p - q).abs().max()
    assert mgup.state[b[0]]["step"].item() == 7


def test_mgup_checkpoint_into_torch_adamw_still_loads():
    a = _params()
    mgup = MGUPAdamW(a, lr=1e-2)
    _run(mgup, a, 2)
    adam = torch.optim.AdamW(_params(), lr=1e-2)
    adam.load_state_dict(mgup.state_dict())
    assert adam.state[adam.param_groups[0]["params"][0]]["exp_avg"].abs().sum() > 0


@pytest.mark.parametrize("src,dst,says", [
    (MGUPLion, MGUPAdamW, "MGUPLion"), (MGUPAdamW, MGUPLion, "MGUPAdamW"), (torch.optim.AdamW, MGUPLion, "exp_avg_sq"),
])
def test_another_rules_state_is_refused_by_name(src, dst, says):
    a = _params()
    opt = src(a, lr=1e-3)
    _run(opt, a, 1)
    target = dst(_params(), lr=1e-3)
    with pytest.raises(ValueError, match=says):
        target.load_state_dict(opt.state_dict())


def test_loaded_state_dict_with_bad_values_is_refused():
    a = _params()
    opt = MGUPAdamW(a)
    _run(opt, a, 1)
    sd = opt.state_dict()
    sd["param_groups"][0]["alpha"] = -3.0  # gradient ascent on the selected coordinates
    with pytest.raises(ValueError, match="alpha"):
        MGUPAdamW(_params()).load_state_dict(sd)


# ----------------------------------------------------------- re-validation
@pytest.mark.parametrize("key,bad", [("mask_ratio", 5), ("alpha", -1.0), ("mode", "bogus"), ("scope", "layer"),
                                     ("lr", float("inf")), ("gamma", float("nan"))])
def test_values_changed_after_construction_are_validated_at_step(key, bad):
    a = _params()
    opt = MGUPAdamW(a)
    opt.param_groups[0][key] = bad
    for p, g in zip(a, _grads(a, 0)):
        p.grad = g
    before = [p.detach().clone() for p in a]
    with pytest.raises(ValueError, match=key):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a, before))  # nothing was applied


@pytest.mark.parametrize("kw", [{"lr": float("inf")}, {"alpha": float("inf")}, {"weight_decay": float("nan")}])
def test_non_finite_hyperparameters_are_refused(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        MGUPAdamW(_params(), **kw)


# ------------------------------------------------------------- non-finite input
def test_lion_nan_gradient_reaches_the_parameter_instead_of_freezing_it():
    a = _params(dtype=torch.float32)
    opt = MGUPLion(a, lr=1e-3)
    a[0].grad = torch.randn(6, 5)
    a[0].grad[1, 2] = float("nan")
    a[1].grad = torch.randn(7)
    opt.step()
    assert torch.isnan(a[0][1, 2]) and torch.isfinite(a[0]).sum() == 29  # visible, as with AdamW


def test_muon_update_is_the_same_for_huge_finite_gradients():
    """Newton-Schulz depends on x / ||x||_F only, so a gradient scaled by 1e30 must give the
    same step; ||x||_F overflows fp32 there (1e30^2 > 3.4e38), which used to zero the update."""
    torch.manual_seed(0)
    g = torch.randn(8, 6)
    moved = []
    for scale in (1.0, 1e30):
        p = torch.nn.Parameter(torch.zeros(8, 6))
        # scores x*g overflow to inf: compare NS alone, in fp32 (bf16, the default, rounds x
        # itself differently at the two scales)
        opt = MGUPMuon([p], lr=1e-2, alpha=1.0, gamma=1.0, ns_dtype=torch.float32)
        p.grad = g * scale
        opt.step()
        moved.append(p.detach().clone())
    assert torch.isfinite(moved[1]).all() and moved[1].abs().max() > 0
    assert torch.allclose(moved[0], moved[1], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------ dtypes and gradient shapes
@pytest.mark.timeout(600)
def test_mixed_precision_params_with_compile():
    ps = [torch.nn.Parameter(torch.randn(9, 4).to(dt)) for dt in (torch.float32, torch.bfloat16, torch.float16)]
    opt = MGUPAdamW(ps, compile=True, lr=1e-2)
    before = [p.detach().clone() for p in ps]
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    assert all(torch.isfinite(p.float()).all() and not torch.equal(p, b) for p, b in zip(ps, before))


@pytest.mark.parametrize("compile_", [False, True])
def test_gradient_of_the_wrong_shape_is_refused(compile_):
    p = torch.nn.Parameter(torch.randn(4, 6))
    opt = MGUPAdamW([p], compile=compile_)
    p.grad = torch.randn(4, 6)
    p.grad.data = torch.randn(6, 4)  # same element count, wrong shape (torch checks only p.grad = ...)
    with pytest.raises(ValueError, match="shape"):
        opt.step()


# ------------------------------------------------------ the authors' formulation
# Their MGUP_AdamW / CMGUP_AdamW (Hugging Face's former ``transformers.AdamW`` with MGUP's
# mask) and MGUP_Lion (lion-pytorch with the mask), written here statement by statement as
# their code has them, independently of mgup_dist's math.  50 steps with weight decay, on
# tensors whose r*N is an integer (int(r*N) = floor(r*N)) and whose scores are never tied
# at the K-th place (there torch.topk's order is unspecified; the reference asserts it).
AUTHORS_STEPS = 50
AUTHORS_SHAPES = [(6, 5), (8,)]  # r = 0.5: K = 15 and 4


def _authors_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=F64)) for s in AUTHORS_SHAPES]


def _authors_grads(ps, step, zeros):
    """Random gradients; ``zeros``: a few exact zeros, whose scores are exactly 0 (the
    cautious s >= 0 case; top-K tests leave them out, they would tie)."""
    g = torch.Generator().manual_seed(2000 + step)
    out = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in ps]
    if zeros:
        out[0][step % 6, :2] = 0.0
        out[1][step % 8] = 0.0
    return out


def _authors_mask(score, ratio, alpha, gamma, cautious):
    """Their mask: alpha on the top int(ratio*N) scores by torch.topk (cautious: where
    score >= 0), gamma elsewhere."""
    if cautious:
        return torch.where(score >= 0, torch.full_like(score, alpha), torch.full_like(score, gamma))
    flat = score.reshape(-1)
    k = int(ratio * flat.numel())
    ranked = flat.sort(descending=True).values
    assert 0 < k < flat.numel() and ranked[k - 1] != ranked[k], "a tie at the K-th place: topk's choice is unspecified"
    mask = torch.full_like(flat, gamma)
    mask[flat.topk(k).indices] = alpha
    return mask.view_as(score)


def _authors_adamw_step(ps, grads, state, *, lr, betas, eps, weight_decay, correct_bias, ratio, alpha, gamma, cautious):
    for p, grad in zip(ps, grads):
        st = state.setdefault(p, {})
        if len(st) == 0:
            st["step"] = 0
            st["exp_avg"] = torch.zeros_like(p)
            st["exp_avg_sq"] = torch.zeros_like(p)
        exp_avg, exp_avg_sq = st["exp_avg"], st["exp_avg_sq"]
        beta1, beta2 = betas
        st["step"] += 1
        if weight_decay > 0.0:
            p.mul_(1 - lr * weight_decay)
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(eps)
        step_size = lr
        if correct_bias:
            bias_correction1 = 1.0 - beta1 ** st["step"]
            bias_correction2 = 1.0 - beta2 ** st["step"]
            step_size = step_size * math.sqrt(bias_correction2) / bias_correction1
        score = (exp_avg / denom) * grad
        mask = _authors_mask(score, ratio, alpha, gamma, cautious)
        p.addcdiv_(exp_avg * mask, denom, value=-step_size)


def _authors_lion_step(ps, grads, state, *, lr, betas, weight_decay, ratio, alpha, gamma, cautious):
    for p, grad in zip(ps, grads):
        st = state.setdefault(p, {})
        if len(st) == 0:
            st["exp_avg"] = torch.zeros_like(p)
        exp_avg = st["exp_avg"]
        beta1, beta2 = betas
        p.mul_(1 - lr * weight_decay)
        update = exp_avg.clone().mul_(beta1).add(grad, alpha=1 - beta1).sign_()
        score = update * grad
        mask = _authors_mask(score, ratio, alpha, gamma, cautious)
        p.add_(update * mask, alpha=-lr)
        exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)


def _authors_run(ps, step_fn, zeros, **kw):
    state = {}
    with torch.no_grad():
        for t in range(AUTHORS_STEPS):
            step_fn(ps, _authors_grads(ps, t, zeros), state, **kw)


def _mgup_run(opt, ps, zeros):
    for t in range(AUTHORS_STEPS):
        for p, g in zip(ps, _authors_grads(ps, t, zeros)):
            p.grad = g
        opt.step()


def _assert_same(ours, theirs):
    for p, q in zip(ours, theirs):
        assert torch.allclose(p, q, rtol=0, atol=1e-12), (p - q).abs().max()


_AUTHORS_CASES = [  # (cautious, correct_bias, foreach, compile)
    (False, True, True, False), (False, False, True, False), (False, True, False, False), (False, True, True, True),
    (True, True, True, False), (True, False, True, False), (True, True, False, False), (True, True, True, True),
]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("cautious,correct_bias,foreach,compile_", _AUTHORS_CASES)
def test_authors_convention_reproduces_their_adamw(cautious, correct_bias, foreach, compile_):
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1)
    mg = dict(mask_ratio=0.5, alpha=2.0, gamma=0.1)
    ours, theirs = _authors_params(), _authors_params()
    cls = CMGUPAdamW if cautious else MGUPAdamW
    opt = cls(ours, convention="authors", correct_bias=correct_bias, foreach=foreach, compile=compile_, **kw, **mg)
    _mgup_run(opt, ours, zeros=cautious)
    _authors_run(theirs, _authors_adamw_step, cautious, correct_bias=correct_bias, ratio=0.5, alpha=2.0, gamma=0.1,
                 cautious=cautious, **kw)
    _assert_same(ours, theirs)
    # and the torch convention is another optimizer (so that the comparison can tell them apart)
    other = _authors_params()
    _mgup_run(cls(other, foreach=foreach, **kw, **mg), other, zeros=cautious)
    assert max((p - q).abs().max().item() for p, q in zip(other, theirs)) > 1e-6


@pytest.mark.timeout(600)
@pytest.mark.parametrize("cautious,foreach,compile_", [(False, True, False), (False, False, False), (False, True, True),
                                                       (True, True, False), (True, False, False), (True, True, True)])
def test_authors_convention_reproduces_their_lion(cautious, foreach, compile_):
    kw = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.5)
    ours, theirs = _authors_params(), _authors_params()
    cls = CMGUPLion if cautious else MGUPLion
    opt = cls(ours, convention="authors", foreach=foreach, compile=compile_, mask_ratio=0.5, alpha=2.0, gamma=0.1, **kw)
    _mgup_run(opt, ours, zeros=cautious)
    _authors_run(theirs, _authors_lion_step, cautious, ratio=0.5, alpha=2.0, gamma=0.1, cautious=cautious, **kw)
    _assert_same(ours, theirs)


def test_authors_cautious_lion_counts_zero_scores_as_aligned():
    """A zero gradient entry with a non-zero momentum: u = sign(b1*m) != 0, s = u*0 = 0:
    alpha under the authors' s >= 0, gamma under s > 0; everything else is identical."""
    g0 = torch.Generator().manual_seed(5)
    grads = [torch.randn(6, 5, generator=g0, dtype=F64), torch.randn(6, 5, generator=g0, dtype=F64)]
    zero = torch.zeros(6, 5, dtype=torch.bool)
    zero[::2, 1] = True
    grads[1][zero] = 0.0
    moves = {}
    for conv in ("authors", "torch"):
        p = torch.nn.Parameter(torch.zeros(6, 5, dtype=F64))
        opt = CMGUPLion([p], lr=1e-3, convention=conv, alpha=2.0, gamma=0.5)
        p.grad = grads[0].clone()
        opt.step()
        before = p.detach().clone()
        p.grad = grads[1].clone()
        opt.step()
        moves[conv] = p.detach() - before
    ratio = moves["authors"][zero] / moves["torch"][zero]
    assert torch.allclose(ratio, torch.full_like(ratio, 4.0))  # alpha / gamma
    assert torch.equal(moves["authors"][~zero], moves["torch"][~zero])
