"""The reference itself, checked against independent formulations: torch's AdamW, the
authors' MGUP-AdamW (topk + scatter, as in their repository), Lion's and Muon's defining
formulas, and hand-computed selections."""
from __future__ import annotations

import math

import pytest
import torch

from mgup_dist import reference as R

F64 = torch.float64


# ----------------------------------------------------------------------- selection
def test_topk_order_nan_lowest_signed_zero_ties_by_index():
    s = torch.tensor([0.0, float("nan"), 3.0, -0.0, 3.0, -1.0, float("-inf"), 0.0], dtype=F64)
    order = R.topk_indices(s, 8)
    # 3.0 (idx 2, then 4), zeros by index (0, 3 (-0.0), 7), -1, -inf, NaN last
    assert order == [2, 4, 0, 3, 7, 5, 6, 1]
    assert R.topk_indices(s, 0) == []
    assert R.topk_indices(s, 3) == [2, 4, 0]


@pytest.mark.parametrize("ratio,n,k", [(0.0, 10, 0), (1.0, 10, 10), (0.5, 7, 3), (0.3, 10, 3), (0.57, 100, 57),
                                       (0.5, 1, 0), (0.99, 1, 0)])
def test_topk_scale_selects_exactly_floor_ratio_n(ratio, n, k):
    s = torch.linspace(-1, 1, n, dtype=F64).flip(0)  # descending: the first k get alpha
    phi = R.mgup_scale(s, mode="topk", mask_ratio=ratio, alpha=2.0, gamma=0.5)
    assert int((phi == 2.0).sum()) == k
    assert torch.equal(phi[:k], torch.full((k,), 2.0, dtype=F64))
    assert torch.equal(phi[k:], torch.full((n - k,), 0.5, dtype=F64))


def test_cautious_scale_and_normalisation():
    s = torch.tensor([1.0, -1.0, 0.0, -0.0, float("nan"), 2.0], dtype=F64)
    phi = R.mgup_scale(s, mode="cautious", mask_ratio=0.5, alpha=1.0, gamma=0.0)
    assert phi.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    # Liang et al.: divide by the mean of the mask (2/6) -> 3 where aligned
    phi = R.mgup_scale(s, mode="cautious", mask_ratio=0.5, alpha=1.0, gamma=0.0, normalize=True)
    assert phi.tolist() == pytest.approx([3.0, 0, 0, 0, 0, 3.0])
    # nothing aligned: the mean 0 is clamped at 1e-3, phi stays 0 (no division by zero)
    phi = R.mgup_scale(-s.abs(), mode="cautious", mask_ratio=0.5, alpha=1.0, gamma=0.0, normalize=True)
    assert torch.equal(phi, torch.zeros(6, dtype=F64))
    # MGUP scales normalised: mean becomes 1
    phi = R.mgup_scale(torch.randn(40, dtype=F64), mode="topk", mask_ratio=0.3, alpha=2.0, gamma=0.5, normalize=True)
    assert phi.mean().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="mode"):
        R.mgup_scale(s, mode="sign", mask_ratio=0.5, alpha=1.0, gamma=0.0)


# --------------------------------------------------------------------------- AdamW
@pytest.mark.parametrize("shape", [(), (1,), (5,), (4, 6)])
def test_adamw_with_unit_scale_is_torch_adamw(shape):
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(shape, generator=gen, dtype=F64)
    q = p.clone().requires_grad_(True)
    opt = torch.optim.AdamW([q], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, foreach=False)
    state = {}
    for _ in range(5):
        g = torch.randn(shape, generator=gen, dtype=F64)
        q.grad = g.clone()
        opt.step()
        R.adamw_step(p, g, state, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1,
                     mode="topk", mask_ratio=0.5, alpha=1.0, gamma=1.0)
    assert (p - q.detach()).abs().max().item() < 1e-14
    assert set(state) == set(opt.state[q]) == {"step", "exp_avg", "exp_avg_sq"}
    assert float(state["step"]) == 5.0
    assert torch.allclose(state["exp_avg_sq"], opt.state[q]["exp_avg_sq"], rtol=1e-14, atol=0)


def _authors_mgup_adamw(p, g, st, lr, b1, b2, eps, wd, ratio, alpha, gamma):
    """The authors' MGUP-AdamW step (github.com/MaeChd/MGUP, MGUP_AdamW.py), transcribed:
    weight decay first, u = m / (sqrt(v) + eps), step size lr * sqrt(bc2) / bc1,
    mask from torch.topk of u * g scattered into a gamma-filled tensor."""
    st["step"] = st.get("step", 0) + 1
    m = st.setdefault("m", torch.zeros_like(p))
    v = st.setdefault("v", torch.zeros_like(p))
    p.add_(p, alpha=-lr * wd)
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    step_size = lr * math.sqrt(1 - b2 ** st["step"]) / (1 - b1 ** st["step"])
    u = m / (v.sqrt() + eps)
    flat = (u * g).flatten()
    _, idx = torch.topk(flat, int(ratio * g.numel()))
    mask = torch.full_like(flat, gamma)
    mask[idx] = alpha
    p.add_(u * mask.reshape_as(g), alpha=-step_size)


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.9])
def test_adamw_matches_the_authors_code_when_eps_is_zero(ratio):
    # With eps = 0 the two eps placements (m_hat / (sqrt(v_hat) + eps) here, bias
    # correction folded into the step size there) are the same real number; random scores
    # have no ties, so torch.topk's unspecified tie order does not matter.
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(8, 9, generator=gen, dtype=F64)
    q = p.clone()
    s_ref, s_auth = {}, {}
    for _ in range(6):
        g = torch.randn(8, 9, generator=gen, dtype=F64)
        R.adamw_step(p, g, s_ref, lr=1e-2, beta1=0.9, beta2=0.999, eps=0.0, weight_decay=0.1,
                     mode="topk", mask_ratio=ratio, alpha=2.0, gamma=0.5)
        _authors_mgup_adamw(q, g, s_auth, 1e-2, 0.9, 0.999, 0.0, 0.1, ratio, 2.0, 0.5)
    assert (p - q).abs().max().item() < 1e-12


def test_adamw_skips_empty_tensors_and_handles_0d():
    p, st = torch.zeros(0, 3, dtype=F64), {}
    assert R.adamw_step(p, torch.zeros(0, 3, dtype=F64), st, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8,
                        weight_decay=0.0) is None
    assert st == {}
    p0 = torch.tensor(1.0, dtype=F64)
    phi = R.adamw_step(p0, torch.tensor(2.0, dtype=F64), st, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8,
                       weight_decay=0.0, mode="topk", mask_ratio=0.5, alpha=2.0, gamma=0.5)
    # N = 1, K = floor(0.5) = 0: gamma; the first AdamW step is lr * sign(g)
    assert phi.item() == 0.5
    assert p0.item() == pytest.approx(1.0 - 1e-2 * 0.5, abs=1e-9)


# ---------------------------------------------------------------------------- Lion
def test_lion_with_unit_scale_is_lion():
    gen = torch.Generator().manual_seed(2)
    p = torch.randn(6, 5, generator=gen, dtype=F64)
    q = p.clone()
    m = torch.zeros_like(q)
    state = {}
    lr, b1, b2, wd = 1e-3, 0.9, 0.99, 0.1
    for _ in range(5):
        g = torch.randn(6, 5, generator=gen, dtype=F64)
        R.lion_step(p, g, state, lr=lr, beta1=b1, beta2=b2, weight_decay=wd, mode="cautious",
                    alpha=1.0, gamma=1.0)
        # Chen et al. (2023), Algorithm 2
        update = torch.sign(b1 * m + (1 - b1) * g)
        q = q - lr * (update + wd * q)
        m = b2 * m + (1 - b2) * g
    assert (p - q).abs().max().item() < 1e-15
    assert torch.equal(state["exp_avg"], m)


# ---------------------------------------------------------------------------- Muon
@pytest.mark.parametrize("shape", [(8, 8), (12, 5), (5, 12)])
def test_newton_schulz_orthogonalises(shape):
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(shape, generator=gen, dtype=F64)
    X = R.newton_schulz5(G, 5)
    sv = torch.linalg.svdvals(X)
    # the quintic coefficients trade exactness for speed: singular values end in ~[0.6, 1.2]
    assert sv.min() > 0.5 and sv.max() < 1.3
    # tall inputs are handled by transposition: NS5(G^T) = NS5(G)^T
    assert torch.allclose(R.newton_schulz5(G.T, 5), X.T, atol=1e-12)
    assert X.dtype == F64


def test_muon_with_unit_scale_is_moonlight_muon():
    gen = torch.Generator().manual_seed(4)
    p = torch.randn(6, 10, generator=gen, dtype=F64)
    q = p.clone()
    buf = torch.zeros_like(q)
    state = {}
    lr, mu, wd = 2e-2, 0.95, 0.1
    for _ in range(4):
        g = torch.randn(6, 10, generator=gen, dtype=F64)
        R.muon_step(p, g, state, lr=lr, momentum=mu, nesterov=True, ns_steps=5, weight_decay=wd,
                    mode="topk", mask_ratio=0.5, alpha=1.0, gamma=1.0)
        # Moonlight: buf = mu buf + g; g' = g + mu buf; u = NS5(g'); p *= 1 - lr wd;
        # p -= lr * 0.2 * sqrt(max(A, B)) * u
        buf = mu * buf + g
        u = R.newton_schulz5(g + mu * buf, 5)
        q = q * (1 - lr * wd) - lr * 0.2 * math.sqrt(10) * u
    assert (p - q).abs().max().item() < 1e-14
    assert torch.equal(state["momentum_buffer"], buf)


def test_muon_score_uses_momentum_before_orthogonalisation():
    gen = torch.Generator().manual_seed(5)
    p = torch.zeros(4, 6, dtype=F64)
    g = torch.randn(4, 6, generator=gen, dtype=F64)
    phi = R.muon_step(p, g, {}, lr=1.0, momentum=0.9, nesterov=True, ns_steps=5, weight_decay=0.0,
                      mode="topk", mask_ratio=0.5, alpha=2.0, gamma=0.5)
    # first step: x = g + 0.9 * g, s = 1.9 g^2: the 12 largest |g| get alpha
    top = set(torch.argsort(g.reshape(-1).abs(), descending=True)[:12].tolist())
    assert {i for i, v in enumerate(phi.reshape(-1).tolist()) if v == 2.0} == top
    assert R.muon_lr(1.0, (768, 2048)) == pytest.approx(0.2 * math.sqrt(2048))
