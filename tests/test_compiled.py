"""compile=True (fused inductor kernels + introselect threshold) selects exactly what the
eager path selects; values agree to rounding (the fused kernel may contract a*b+c)."""
import pytest
import torch

from mgup_dist import CMGUPAdamW, CMGUPLion, MGUPAdamW, MGUPLion


def _params(dtype):
    g = torch.Generator().manual_seed(0)
    shapes = [(17, 5), (300,), (1,), (), (0,), (64, 3)]
    return [torch.randn(s, generator=g, dtype=dtype) for s in shapes]


def _grads(ps, step):
    g = torch.Generator().manual_seed(100 + step)
    out = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in ps]
    out[0][::2] = 0.0          # rows of zero gradient: many tied scores (tie path)
    out[5][:, 1] = float("nan")  # NaN scores rank lowest
    out[5][:, 2] = out[5][:, 0]  # exact duplicates
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("cls", [MGUPAdamW, CMGUPAdamW, MGUPLion, CMGUPLion])
def test_compiled_matches_eager_fp64(cls):
    base = _params(torch.float64)
    eager = [torch.nn.Parameter(b.clone()) for b in base]
    fused = [torch.nn.Parameter(b.clone()) for b in base]
    kw = dict(lr=1e-2, weight_decay=0.1)
    o1, o2 = cls(eager, **kw), cls(fused, compile=True, **kw)
    for step in range(4):
        for ps in (eager, fused):
            for p, g in zip(ps, _grads(base, step)):
                p.grad = g.clone()
        o1.step()
        o2.step()
        for a, b in zip(eager, fused):
            # NaN gradients poison the AdamW moments of that column in both paths alike
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-14, equal_nan=True), (cls.__name__, step, (a - b).abs().max())
    # a wrong selection would show as lr*(alpha-gamma)*|u| ~ 1e-2 differences, far above 1e-12
    assert o2.state[fused[0]].keys() == o1.state[eager[0]].keys()


@pytest.mark.timeout(600)
def test_compiled_fp32_and_bf16_run():
    for dtype in (torch.float32, torch.bfloat16):
        ps = [torch.nn.Parameter(torch.randn(33, 7).to(dtype))]
        opt = MGUPAdamW(ps, lr=1e-3, compile=True)
        before = ps[0].detach().clone()
        for _ in range(3):
            ps[0].grad = torch.randn_like(ps[0])
            opt.step()
        assert torch.isfinite(ps[0].float()).all() and not torch.equal(before, ps[0].detach())


@pytest.mark.timeout(900)
@pytest.mark.parametrize("rule", ["adamw", "lion"])
def test_compiled_kernels_are_parallel_and_stay_in_fp32(rule):
    """The C++ Inductor writes for fp32 params: every phase one OpenMP-parallel loop, and
    no float64 vectors (a float64 0-d scalar would drag phi and u * phi into float64)."""
    from torch._inductor.utils import run_and_get_code

    from mgup_dist.kernels import cpu

    n = 1 << 12
    g, m, v, p = (torch.randn(n) for _ in range(4))
    v = v.abs()
    key = torch.zeros(n, dtype=torch.int32)
    c = torch.tensor([0.9, 0.1, 0.999, 0.001, 2.0, 0.5, 0.9999, 1e-3, 0.1, 0.01, 1e-8])
    t = torch.tensor(0, dtype=torch.int32)
    st = (m, v) if rule == "adamw" else (m,)
    args = {"score": (g, *st, key, c), "apply": (p, g, *st, key, t, c), "cautious": (p, g, *st, c)}
    for phase, a in args.items():
        fn = torch.compile(cpu._make(rule, phase, False, False), dynamic=True, fullgraph=True)
        # Inductor parallelises for torch's thread count, which conftest sets to 1: ask for 2
        with torch._inductor.config.patch({"cpp.threads": 2}):
            _, codes = run_and_get_code(fn, *a)
        code = "\n".join(codes)
        assert "#pragma omp parallel" in code, (rule, phase)
        assert "Vectorized<double>" not in code and "VectorizedN<double" not in code, (rule, phase)
        assert "Vectorized<float>" in code, (rule, phase)
