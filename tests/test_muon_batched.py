"""MGUPMuon's batched Newton-Schulz: same-shape matrices (tall ones transposed into their
wide class) go through one stacked ``bmm``/``baddbmm`` chain.  It must give what the
matrix-by-matrix form gives at the same dtype, run in bfloat16 by default as
``torch.optim.Muon`` does, and orthogonalise a matrix split across ranks identically on
every rank that holds a piece of it."""
from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed

from mgup_dist import MGUPMuon
from mgup_dist.opcount import count_step, model_params, muon_adamw_params
from mgup_dist.pipeline import _orthogonalise
from mgup_dist.reference import newton_schulz5
from mgup_dist.rules import muon_lr_scale, newton_schulz, newton_schulz_batched

# wide, tall (transposed into the wide class of the same dims), square, repeated shapes, a row,
# a column, an empty matrix
SHAPES = [(5, 9), (9, 5), (5, 9), (4, 4), (4, 4), (4, 4), (1, 7), (7, 1), (9, 5), (0, 3)]


def _mats(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.bfloat16, 0.05)], ids=["float64", "bfloat16"])
def test_batched_equals_matrix_by_matrix(dtype, tol):
    """Every matrix scaled by 0.2*sqrt(max(A,B)) * NS5 in place, as ``newton_schulz`` one by one
    (float64: to rounding; bfloat16: within bf16's NS error, which the float64 reference
    bounds for both).  A batch that mixed up matrices, or a tall matrix not transposed back,
    would be off by O(1)."""
    xs = _mats()
    want = [newton_schulz(x, 5, dtype).double() * muon_lr_scale(x.shape) if x.numel() else x.clone() for x in xs]
    got = [x.clone() for x in xs]
    _orthogonalise([(x, x.shape, None) for x in got], 5, dtype)
    for x, g, w, s in zip(xs, got, want, SHAPES):
        assert g.shape == s
        if not x.numel():
            continue
        scale = muon_lr_scale(s)
        assert (g - w).abs().max().item() <= tol * scale, (s, (g - w).abs().max().item())
        ref = newton_schulz5(x) * scale  # the float64 specification
        assert (g - ref).abs().max().item() <= tol * scale, s


def test_batched_normalisation_is_overflow_safe_and_keeps_non_finite_visible():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 6, generator=gen)
    plain = newton_schulz_batched([x.clone()], 5)[0]
    for dtype, big in ((torch.float32, 1e30), (torch.float64, 1e200)):
        huge = newton_schulz_batched([x.to(dtype) * big], 5)[0]  # ||x||_F^2 overflows the dtype
        assert torch.isfinite(huge).all()
        assert torch.allclose(huge.float(), plain, atol=1e-5), dtype
    zero = newton_schulz_batched([torch.zeros(2, 3, 4)], 5)[0]
    assert torch.equal(zero, torch.zeros(2, 3, 4))
    bad = x.clone()
    bad[1, 2, 3] = float("nan")
    bad[2, 0, 0] = float("inf")
    out = newton_schulz_batched([bad], 5)[0]
    assert torch.isfinite(out[0]).all() and not torch.isfinite(out[1]).any() and not torch.isfinite(out[2]).all()


def test_default_newton_schulz_dtype_is_bfloat16_like_torch_muon():
    """ns_dtype="auto" is bfloat16 on the CPU too (bit for bit the explicit choice), and with
    alpha = gamma = 1 MGUPMuon is torch.optim.Muon with Moonlight's lr adjustment: torch's
    momentum is an EMA, (1 - mu) times MGUP's, which NS normalises away."""
    gen = torch.Generator().manual_seed(2)
    init = [torch.randn(s, generator=gen) for s in [(6, 10), (10, 6), (8, 8)]]
    runs = {}
    for name in ("auto", "bf16", "torch"):
        ps = [torch.nn.Parameter(p.clone()) for p in init]
        if name == "torch":
            opt = torch.optim.Muon(ps, lr=2e-2, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
        else:
            kw = {} if name == "auto" else {"ns_dtype": torch.bfloat16}
            opt = MGUPMuon(ps, lr=2e-2, alpha=1.0, gamma=1.0, **kw)
        g2 = torch.Generator().manual_seed(3)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g2)
            opt.step()
        runs[name] = [p.detach() for p in ps]
    for a, b, c, p0 in zip(runs["auto"], runs["bf16"], runs["torch"], init):
        assert torch.equal(a, b)
        # three steps of lr * 0.2*sqrt(max) * O(1) entries: bf16 NS differences stay within 2 %
        step = 3 * 2e-2 * muon_lr_scale(p0.shape)
        assert (a - c).abs().max().item() <= 0.02 * step, (a - c).abs().max().item()
        assert (a - p0).abs().max().item() > 0.1 * step


def test_launches_fixed_plus_fifteen_per_shape_class():
    """Newton-Schulz costs 15 device ops (5 x bmm, baddbmm, baddbmm) per shape class, whatever
    the number of matrices; the rest of the step is a fixed count, the same for 111 and
    333 tensors.  LLaMA-130M on the CUDA path (Triton for the AdamW group): at most 60 + 15
    per distinct matrix shape."""
    fixed = {}
    for backend in ("torch", "triton"):
        if backend == "triton":
            pytest.importorskip("triton")
        for split in (1, 3):
            ps = model_params("llama130m", split)
            skip = {id(p) for p in muon_adamw_params(ps, split)}
            mats = [p for p in ps if p.ndim == 2 and id(p) not in skip]
            classes = {tuple(sorted(p.shape)) for p in mats}
            res = count_step(lambda q: MGUPMuon(q, adamw_params=muon_adamw_params(q, split), backend=backend), ps)
            ops = res["ops"]
            assert ops["aten.bmm"] == 5 * len(classes) and ops["aten.baddbmm"] == 10 * len(classes), ops
            assert ops["aten.mm"] == 0, ops
            fixed[backend, split] = res["total"] - 15 * len(classes)
            if backend == "triton" and split == 1:
                shapes = {tuple(p.shape) for p in mats}
                assert res["total"] <= 60 + 15 * len(shapes), (res["total"], len(shapes))
        assert fixed[backend, 1] == fixed[backend, 3], fixed


# ---------------------------------------------------------------- split matrices, 3 ranks
# four matrices laid end to end (ZeRO-style flat partition), cut across 3 ranks:
#   rank 0: T0 whole, T1[0:6];  rank 1: T1[6:24], T2[0:18];  rank 2: T2[18:24], T3 whole
# T1 (holders 0, 1) and T2 (holders 1, 2) have the same shape: rank 1 must not batch them
# together, or rank 0 / rank 2 would run another batch composition than rank 1 does.
FLAT = [(0, (4, 6)), (1, (4, 6)), (2, (4, 6)), (3, (6, 4))]
CUTS = [(0, 30), (30, 66), (66, 96)]


def _flat_layouts(lo, hi):
    from mgup_dist.layout import Layout, Segment

    segs, pos = [], 0
    for tid, shape in FLAT:
        n = shape[0] * shape[1]
        a, b = max(lo, pos), min(hi, pos + n)
        if a < b:
            segs.append(Segment(tid, a - lo, b - a, a - pos, n, shape))
        pos += n
    return Layout(tuple(segs), hi - lo, collective=((1, 24), (2, 24)))


def _split_worker(rank, world):
    from mgup_dist.plan import build_plan

    lo, hi = CUTS[rank]
    gen = torch.Generator().manual_seed(7)
    full = torch.randn(96, generator=gen)
    flat = torch.nn.Parameter(full[lo:hi].clone())
    opt = MGUPMuon([{"params": [flat], "use_muon": True}], lr=2e-2, mask_ratio=0.5)
    lay = _flat_layouts(lo, hi)
    opt.set_layout(flat, lay)
    for _ in range(2):
        g = torch.randn(96, generator=gen)
        flat.grad = g[lo:hi].clone()
        opt.step()
    plan = build_plan([lay], "tensor", 0.5, assemble=True)
    split = [c for c in plan.chunks if c.tensors][0]
    return flat.detach().clone(), split.tensor_holders, split.tensor_shapes


def test_split_matrices_orthogonalised_alike_on_every_holder():
    results = run_distributed(_split_worker, 3, timeout=120)
    holders = [r[1] for r in results]
    assert holders == [((0, 1), None), ((0, 1), (1, 2)), (None, (1, 2))], holders
    assert all(r[2] == ((4, 6), (4, 6)) for r in results)
    got = torch.cat([r[0] for r in results])
    # the same steps on one process, every matrix whole
    gen = torch.Generator().manual_seed(7)
    full = torch.randn(96, generator=gen)
    ps, pos = [], 0
    for _, shape in FLAT:
        n = shape[0] * shape[1]
        ps.append(torch.nn.Parameter(full[pos: pos + n].view(shape).clone()))
        pos += n
    opt = MGUPMuon([{"params": ps, "use_muon": True}], lr=2e-2, mask_ratio=0.5)
    for _ in range(2):
        g = torch.randn(96, generator=gen)
        pos = 0
        for p in ps:
            p.grad = g[pos: pos + p.numel()].view(p.shape).clone()
            pos += p.numel()
        opt.step()
    want = torch.cat([p.detach().reshape(-1) for p in ps])
    assert torch.equal(got, want), (got - want).abs().max()
