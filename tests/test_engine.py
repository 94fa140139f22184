"""The GPU-ready engine on the CPU: the device-agnostic backend selects exactly what the
definition selects, without a single host read in a step; the memory bounds; torch.compile
of a whole step; the torch conventions (maximize, refused options, resolved defaults)."""
from __future__ import annotations

import pytest
import torch
from test_selection import reference_mask, score_cases
from torch.utils._python_dispatch import TorchDispatchMode

import mgup_dist
from mgup_dist import CMGUPAdamW, MGUPAdamW, MGUPLion, MGUPMuon, plan
from mgup_dist.kernels.cpu import CPU
from mgup_dist.kernels.torch_ops import TorchOps
from mgup_dist.layout import Layout, Segment
from mgup_dist.memory import StepPeak, held_bytes, state_bytes
from mgup_dist.selection import Entry, select_masks


# ------------------------------------------------------------------ selection
def _cases():
    for s in score_cases():
        yield s
    yield torch.zeros(0)
    t = torch.randn(4000, generator=torch.Generator().manual_seed(3))
    t[: 3000] = 0.0  # embedding rows of unseen tokens: most scores exactly zero (tie case)
    yield t


@pytest.mark.parametrize("backend", [TorchOps(), TorchOps(foreach=False), CPU()], ids=["torch", "torch-loop", "cpu"])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 1.0])
def test_batched_selection_of_many_tensors_matches_definition(backend, ratio):
    """All tensors of a group in one chunk, as one batched radix select (torch ops) or
    introselect per tensor (CPU), plus a buffer with padding and two segments."""
    scores = list(_cases())
    entries = []
    for i, s in enumerate(scores):
        n = s.numel()
        lay = Layout((Segment(i, 0, n, 0, n),) if n else (), n)
        entries.append(Entry(lay, s.clone(), torch.empty(n, dtype=torch.bool)))
    # one flat buffer: [2 padding][tensor A: 50][3 padding][tensor B: 30]
    a, b = torch.randn(50), torch.randint(-2, 3, (30,)).float()
    flat = torch.cat([torch.zeros(2), a, torch.zeros(3), b])
    lay = Layout((Segment(100, 2, 50, 0, 50), Segment(101, 55, 30, 0, 30)), 85)
    entries.append(Entry(lay, flat.clone(), torch.empty(85, dtype=torch.bool)))
    select_masks(entries, ratio, "tensor", backend=backend)
    for e, s in zip(entries, scores):
        k = plan.num_selected(ratio, s.numel())
        assert torch.equal(e.mask, reference_mask(s, k)), (ratio, s[:10])
    m = entries[-1].mask
    assert not m[:2].any() and not m[52:55].any()  # padding is never selected
    assert torch.equal(m[2:52], reference_mask(a, plan.num_selected(ratio, 50)))
    assert torch.equal(m[55:], reference_mask(b, plan.num_selected(ratio, 30)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_radix_select_of_a_tensor_cut_into_pieces(dtype):
    """One tensor in 3 pieces of 3 buffers (as shards are): the tie prefix runs across
    pieces in index order; 64-bit keys take seven passes."""
    s = torch.randint(-3, 4, (301,)).to(dtype)
    s[::17] = float("nan")
    cuts = [0, 100, 101, 301]
    entries = []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        lay = Layout((Segment(0, 0, hi - lo, lo, 301),), hi - lo, collective=((0, 301),))
        entries.append(Entry(lay, s[lo:hi].clone(), torch.empty(hi - lo, dtype=torch.bool)))
    for ratio in (0.1, 0.5, 0.77):
        select_masks(entries, ratio, "tensor", backend=TorchOps())
        got = torch.cat([e.mask for e in entries])
        assert torch.equal(got, reference_mask(s, plan.num_selected(ratio, 301)))


# ----------------------------------------------------------------- no host sync
#: ops that read a device value back to the host (or need its value to size a result)
SYNCING = {"_local_scalar_dense", "item", "nonzero", "masked_select", "is_nonzero", "equal", "allclose", "unique",
           "_unique2", "bincount", "kthvalue", "sort", "topk"}


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(func.__name__.split(".")[0])
        if func.__name__.startswith("index.") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else [])
        ):
            self.seen.append("boolean indexing")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cls,kw", [
    (MGUPAdamW, {}), (MGUPAdamW, {"scope": "shard"}), (MGUPAdamW, {"scope": "global", "normalize": True}),
    (MGUPAdamW, {"mask_ratio": 0.0}), (CMGUPAdamW, {"normalize": True}), (MGUPLion, {}),
    (MGUPMuon, {}), (MGUPAdamW, {"maximize": True}),
], ids=["adamw", "shard", "global-norm", "r0", "cautious-norm", "lion", "muon", "maximize"])
def test_a_step_of_the_device_backend_never_reads_back(cls, kw):
    """What CUDA's sync-debug mode checks on a GPU, checked op by op on the CPU: after a
    first step (which builds and uploads the plan's small tables), a step of the
    device-agnostic backend with the step counter on the device (capturable) calls no op
    that reads a value back to the host."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in [(40, 30), (30,), (7, 7), (1,)]]
    ps[0].grad = torch.randn(40, 30)
    ps[0].grad[:20] = 0  # ties
    for p in ps[1:]:
        p.grad = torch.randn_like(p)
    extra = {} if cls is MGUPMuon else {"capturable": True}
    opt = cls(ps, backend="torch", **extra, **kw)
    opt.step()
    with _Ops() as rec:
        opt.step()
    bad = sorted(set(rec.seen) & (SYNCING | {"boolean indexing"}))
    if cls is MGUPMuon:  # its AdamW part keeps torch's CPU step counter: .item() of a host tensor only
        bad = [b for b in bad if b != "_local_scalar_dense"]
    assert not bad, bad
    assert all(torch.isfinite(p).all() for p in ps)


# ---------------------------------------------------------------------- memory
ALL = sorted(mgup_dist.OPTIMIZERS)


def step_beside_adamw(name, ps, steps=2, **kw):
    """The MGUP optimizer ``name`` on ``ps`` and torch's AdamW on copies, stepped ``steps``
    times with the same gradients: (mgup optimizer, AdamW, number of elements)."""
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = mgup_dist.OPTIMIZERS[name](ps, **kw)
    base = torch.optim.AdamW(ref)
    for _ in range(steps):
        for p, q in zip(ps, ref):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        base.step()
    return opt, base, sum(p.numel() for p in ps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compile"])
def test_persistent_bytes_within_one_byte_of_adamw(name, dtype, compile_):
    """State (what a checkpoint carries and the optimizer keeps per parameter) is AdamW's:
    +0 bytes a parameter, within the +1 byte a parameter MGUP may add, fp32 and bf16 params."""
    if compile_ and "Muon" in name:
        pytest.skip("Muon's matrices have no compiled kernels")
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in [(64, 48), (48,), (300,)]]
    opt, base, n = step_beside_adamw(name, ps, compile=compile_)
    assert state_bytes(opt) / n <= state_bytes(base) / n + 1, (state_bytes(opt) / n, state_bytes(base) / n)


def test_step_transient_memory_is_bounded_by_the_largest_chunk(monkeypatch):
    """A step allocates, at its peak, a few dozen bytes per element of one chunk, and a chunk
    holds max(largest tensor, CHUNK_ELEMS) elements: not the model.  With 40 tensors of 2k
    elements and chunks of 4k, the peak stays far below the 80k-element model (whose step
    would take 80k x that)."""
    monkeypatch.setattr(plan, "CHUNK_ELEMS", 4096)
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(2000)) for _ in range(40)]
    # bytes per chunk element: CPU (introselect) keys, mask, phi, ids; torch ops (radix) also
    # int64 digits, bin indices and tie ranks
    for backend, per_elem in (("cpu", 32), ("torch", 96)):
        opt = MGUPAdamW(ps, backend=backend)
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        with StepPeak() as m:
            opt.step()
        bound = per_elem * 4096
        assert 0 < m.peak <= bound, (backend, m.peak, bound)
        assert held_bytes(opt) - state_bytes(opt) <= 8 * 4096  # CPU scratch kept between steps: one chunk


# ------------------------------------------------------------------- torch.compile
@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_torch_compile_of_a_topk_step(backend):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(40, 30)), torch.nn.Parameter(torch.randn(30))]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    eager, compiled = MGUPAdamW(ps, backend=backend), MGUPAdamW(qs, backend=backend)
    step = torch.compile(compiled.step)
    for _ in range(3):
        for p, q in zip(ps, qs):
            p.grad = torch.randn_like(p)
            p.grad[::3] = 0
            q.grad = p.grad.clone()
        eager.step()
        step()
    for p, q in zip(ps, qs):
        # same selection: a different one would differ by lr*(alpha-gamma)*|u| ~ 1e-3
        assert (p - q).abs().max() < 1e-6


# ------------------------------------------------------------- torch conventions
def test_maximize_with_unit_scale_is_torch_adamw_maximize():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5, 4, dtype=torch.float64))]
    qs = [torch.nn.Parameter(ps[0].detach().clone())]
    a = MGUPAdamW(ps, lr=1e-2, alpha=1.0, gamma=1.0, maximize=True)
    b = torch.optim.AdamW(qs, lr=1e-2, maximize=True)
    for _ in range(5):
        g = torch.randn(5, 4, dtype=torch.float64)
        ps[0].grad, qs[0].grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert torch.allclose(ps[0], qs[0], rtol=0, atol=1e-14)


@pytest.mark.parametrize("kw,hint", [({"amsgrad": True}, "amsgrad=False"), ({"fused": True}, "backend"),
                                     ({"differentiable": True}, "differentiable=False")])
def test_torch_options_mgup_cannot_honour_are_refused_by_name(kw, hint):
    with pytest.raises(ValueError) as e:
        MGUPAdamW([torch.nn.Parameter(torch.zeros(3))], **kw)
    assert next(iter(kw)) in str(e.value) and hint in str(e.value)


def test_defaults_show_resolved_alpha_and_gamma():
    opt = MGUPAdamW([torch.nn.Parameter(torch.zeros(3))], tau=0.8)
    assert opt.defaults["alpha"] == pytest.approx(1.25) and opt.defaults["gamma"] == pytest.approx(0.8)
    assert MGUPLion([torch.nn.Parameter(torch.zeros(3))]).defaults["alpha"] == 2.0


def test_capturable_lr_tensor_equals_float_lr():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(6, 5))]
    qs = [torch.nn.Parameter(ps[0].detach().clone())]
    a = MGUPAdamW(ps, lr=torch.tensor(1e-2), capturable=True, backend="torch")
    b = MGUPAdamW(qs, lr=1e-2)
    for _ in range(3):
        g = torch.randn(6, 5)
        ps[0].grad, qs[0].grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert torch.allclose(ps[0], qs[0], atol=1e-7) and a.state[ps[0]]["step"].item() == 3
