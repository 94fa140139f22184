"""GPU tests of the CUDA (Triton) backend and of the optimizers on CUDA.  Skipped without a
CUDA device; run on a GPU machine with ``python -m pytest -q tests/test_cuda.py``."""
import pytest
import torch

import mgup_dist
from mgup_dist import reference as R

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEV = "cuda"
HP = {"adamw": dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1),
      "lion": dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)}
SHAPES = [(), (1,), (7,), (9, 4), (0, 3), (300, 70)]


def _opt(rule, params, **kw):
    cls = {"adamw": mgup_dist.MGUPAdamW, "lion": mgup_dist.MGUPLion}[rule]
    return cls(params, **dict(HP[rule], mask_ratio=0.3, alpha=2.0, gamma=0.5, **kw))


def _ref_step(rule, p, g, st):
    h = HP[rule]
    if rule == "adamw":
        R.adamw_step(p, g, st, lr=h["lr"], beta1=h["betas"][0], beta2=h["betas"][1], eps=h["eps"],
                     weight_decay=h["weight_decay"], mask_ratio=0.3, alpha=2.0, gamma=0.5)
    else:
        R.lion_step(p, g, st, lr=h["lr"], beta1=h["betas"][0], beta2=h["betas"][1],
                    weight_decay=h["weight_decay"], mask_ratio=0.3, alpha=2.0, gamma=0.5)


@pytest.mark.parametrize("rule", ["adamw", "lion"])
def test_float64_matches_reference(rule):
    gen = torch.Generator().manual_seed(0)
    cpu = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    params = [p.to(DEV) for p in cpu]
    opt = _opt(rule, params)
    states = [dict() for _ in cpu]
    for _ in range(3):
        for p, c, st in zip(params, cpu, states):
            g = torch.randn(c.shape, generator=gen, dtype=torch.float64)
            p.grad = g.to(DEV)
            _ref_step(rule, c, g, st)
        opt.step()
        for p, c in zip(params, cpu):
            torch.testing.assert_close(p.cpu(), c, rtol=0, atol=1e-12)


def test_select_on_cuda_equals_the_generic_select_on_cpu():
    """fp32 keys with many ties, +-0 and NaN, tensors over several programs: the Triton
    select (compiled, on CUDA) gives the thresholds and resolved keys of the generic radix
    select of the torch-ops backend on the CPU, bit for bit."""
    from mgup_dist import selection
    from mgup_dist.kernels.base import KEY_NAN, key_of
    from mgup_dist.kernels.torch_ops import TorchOps
    from mgup_dist.kernels.triton_cuda import TritonCUDA
    from mgup_dist.layout import whole_layout
    from mgup_dist.plan import build_plan

    gen = torch.Generator().manual_seed(1)
    sizes = [100_000, 1, 0, 40_000, 3, 300_000]
    ts = [torch.randn(n, generator=gen) for n in sizes]
    for ratio in (0.3, 0.5, 0.93):
        chunk_cpu = build_plan([whole_layout(t, i) for i, t in enumerate(ts)], "tensor", ratio).chunks[0]
        chunk_gpu = build_plan([whole_layout(t, i) for i, t in enumerate(ts)], "tensor", ratio).chunks[0]
        vals = torch.randn(chunk_cpu.numel, generator=gen).round(decimals=1)  # many ties
        vals[::11] = 0.0
        vals[5::13] = -0.0
        vals[7::101] = float("nan")
        keys = key_of(vals, torch.int32)
        assert int((keys == KEY_NAN(torch.int32)).sum()) > 0
        kc, kg = keys.clone(), keys.to(DEV)
        t_cpu = selection.threshold(TorchOps(), chunk_cpu, kc)
        t_gpu = TritonCUDA().select(chunk_gpu, kg, None, selection.chunk_reduce(chunk_gpu))
        assert torch.equal(t_gpu.cpu(), t_cpu.to(torch.int32))
        assert torch.equal(kg.cpu(), kc)


def test_a_chunk_of_padding_only_and_nan_in_bf16():
    """Padding that spills into a chunk of its own (no unit: every per-unit table is the padding
    slot's) and a NaN gradient in bf16: the step runs, and NaN stays NaN (not +-0)."""
    from mgup_dist.layout import Layout, Segment

    p = torch.zeros(5000, device=DEV, dtype=torch.bfloat16)
    p.grad = torch.randn(5000, device=DEV).to(torch.bfloat16)
    p.grad[7] = float("nan")
    opt = mgup_dist.MGUPAdamW([p], lr=1e-2, chunk_elems=1000)
    opt.set_layout(p, Layout(segments=(Segment("a", 0, 1000, 0, 1000, (1000,)),), numel=5000))
    opt.step()
    assert torch.isnan(p[7]) and torch.isnan(opt.state[p]["exp_avg"][7])
    assert torch.isfinite(p[1000:]).all() and (p[1000:] != 0).any()  # padding stepped with gamma


@pytest.mark.parametrize("rule", ["adamw", "lion"])
def test_keys_and_step_bitwise_equal_to_torch_ops_on_cuda(rule):
    """fp32 on CUDA: the Triton score writes the same keys as the torch-ops backend (explicit
    fma where torch fuses, IEEE div/sqrt, no other contraction), and apply the same params."""
    from mgup_dist.kernels.base import Bufs
    from mgup_dist.kernels.torch_ops import TorchOps
    from mgup_dist.kernels.triton_cuda import TritonCUDA
    from mgup_dist.layout import whole_layout
    from mgup_dist.plan import build_plan
    from mgup_dist.rules import RULES

    gen = torch.Generator().manual_seed(6)
    sizes = [50_000, 3, 20_000]
    chunk = build_plan([whole_layout(torch.empty(n), i) for i, n in enumerate(sizes)], "tensor", 0.3).chunks[0]
    hp = dict(HP[rule], eps=1e-8, alpha=2.0, gamma=0.5, convention="torch", maximize=False, state=RULES[rule].state)

    def bufs():
        g = torch.Generator().manual_seed(7)
        mk = [lambda n: torch.randn(n, generator=g).to(DEV), lambda n: torch.rand(n, generator=g).to(DEV)]
        return Bufs([mk[0](n) for n in sizes], [mk[0](n) for n in sizes],
                    {s: [mk[1](n) for n in sizes] for s in RULES[rule].state}, [0.271] * 3, [0.0298] * 3)

    out = []
    for be in (TorchOps(), TritonCUDA()):
        b = bufs()
        scratch = torch.empty(chunk.numel, device=DEV)
        be.score(RULES[rule], hp, chunk, b, scratch)
        keys = scratch.view(torch.int32).clone()
        t_key = keys[[0, 50_000, 50_003]]  # any thresholds: the same for both
        be.apply(RULES[rule], hp, chunk, b, scratch, t_key, None)
        out.append((keys, b))
    (k0, b0), (k1, b1) = out
    assert torch.equal(k0, k1)
    for x, y in zip(b0.params, b1.params):
        assert torch.equal(x, y)
    del gen


@pytest.mark.parametrize("rule", ["adamw", "lion"])
def test_step_does_not_synchronise(rule):
    gen = torch.Generator().manual_seed(2)
    params = [torch.randn(s, generator=gen).to(DEV) for s in SHAPES]
    opt = _opt(rule, params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # first step: state allocation and plan building may read the host
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(p).all() for p in params)


SYNC_CONFIGS = {
    "capturable-float-lr": dict(capturable=True),
    "capturable-tensor-lr": dict(capturable=True, lr="tensor"),
    "normalize-global": dict(normalize=True, scope="global"),
    "cautious-capturable": dict(mode="cautious", capturable=True),
    "authors": dict(convention="authors"),
}


@pytest.mark.parametrize("uneven", [False, True], ids=["even", "uneven-steps"])
@pytest.mark.parametrize("config", sorted(SYNC_CONFIGS))
@pytest.mark.parametrize("rule", ["adamw", "lion"])
def test_no_synchronising_copy_in_any_configuration(rule, config, uneven):
    """Every factory call and host-to-device copy of a step (tests/_sync_spy.py) is pinned and
    non-blocking or absent, and CUDA's sync debug mode sees no synchronisation; a group mixing
    bf16 weights with fp32 norms, a param without a grad at first (uneven step counts)."""
    from _sync_spy import sync_spy

    kw = dict(SYNC_CONFIGS[config])
    if kw.get("lr") == "tensor":
        kw["lr"] = torch.tensor(HP[rule]["lr"], device=DEV)
    if rule == "lion" and kw.get("convention"):
        pytest.skip("the authors' convention is AdamW's")
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(s, generator=gen).to(DEV, torch.bfloat16 if i % 2 else torch.float32)
              for i, s in enumerate(SHAPES)]
    opt = _opt(rule, params, **kw)
    for step in range(3):
        for i, p in enumerate(params):
            p.grad = None if (uneven and step == 0 and i == 3) else torch.randn_like(p)
        torch.cuda.synchronize()
        if step:
            torch.cuda.set_sync_debug_mode("error")
        try:
            with sync_spy() as (bad, _):
                opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        if step:
            assert not bad, bad
    assert all(torch.isfinite(p.float()).all() for p in params)


@pytest.mark.parametrize("rule", ["adamw", "lion"])
def test_cuda_graph_replay_equals_eager(rule):
    def make():
        gen = torch.Generator().manual_seed(3)
        ps = [torch.randn(s, generator=gen).to(DEV) for s in SHAPES]
        for p in ps:
            p.grad = torch.zeros_like(p)
        return ps, _opt(rule, ps, lr=torch.tensor(1e-2, device=DEV), capturable=True)

    gen = torch.Generator().manual_seed(4)
    grads = [[torch.randn(s, generator=gen).to(DEV) for s in SHAPES] for _ in range(4)]
    eager, opt_e = make()
    graphed, opt_g = make()
    for ps, opt in ((eager, opt_e), (graphed, opt_g)):  # warm-up step outside the graph
        for p, g in zip(ps, grads[0]):
            p.grad.copy_(g)
        opt.step()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(graph):
        opt_g.step()
    torch.cuda.current_stream().wait_stream(s)
    for gs in grads[1:]:
        for p, q, g in zip(eager, graphed, gs):
            p.grad.copy_(g)
            q.grad.copy_(g)
        opt_e.step()
        graph.replay()
    torch.cuda.synchronize()
    for p, q in zip(eager, graphed):
        assert torch.equal(p, q)


@pytest.mark.parametrize("rule", ["adamw", "lion"])
def test_bf16_params_follow_fp32_master_copy(rule):
    """bf16 params: the step stays within a few bf16 ulps of the same step on fp32 copies."""
    gen = torch.Generator().manual_seed(5)
    p32 = [torch.randn(s, generator=gen).to(DEV) for s in SHAPES]
    p16 = [p.to(torch.bfloat16) for p in p32]
    p32 = [p.float() for p in p16]
    o32, o16 = _opt(rule, p32), _opt(rule, p16)
    for p, q in zip(p32, p16):
        g = torch.randn(p.shape, generator=gen).to(DEV).bfloat16().float()  # the same gradient in both
        p.grad, q.grad = g, g.to(torch.bfloat16)
    o32.step()
    o16.step()
    for p, q in zip(p32, p16):
        assert q.dtype == torch.bfloat16
        torch.testing.assert_close(q.float(), p, rtol=2e-2, atol=2e-2)


def test_capture_without_capturable_is_refused():
    """Without capturable=True the step counter is a CPU tensor and the bias corrections are
    kernel arguments: a replay would reuse them for ever.  As torch's AdamW, refuse."""
    p = torch.randn(100, device=DEV)
    p.grad = torch.randn_like(p)
    opt = mgup_dist.MGUPAdamW([p])
    opt.step()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capturable"):
        with torch.cuda.stream(s), torch.cuda.graph(graph):
            opt.step()
