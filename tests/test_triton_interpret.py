"""The Triton backend's kernels through Triton's interpreter on CPU tensors (TRITON_INTERPRET=1
is set before triton is imported), against the torch-ops backend and the generic selection.
Small spans/blocks, so that pieces span several programs and programs several loop iterations
(the unmasked main loop and the masked tail both run).

Exactness: the selection on the SAME keys is bit for bit the generic radix select
(``selection.threshold``): thresholds and resolved keys.  Lion's keys, states and params are
bitwise equal to the torch-ops backend.  Half-precision states
are rounded once per update by the kernels and after every op by torch: within an ulp.  AdamW:
``m`` is bitwise, ``v`` within an ulp (the
kernel rounds ``addcmul`` as torch does on CUDA, ``fma(1-b2, g*g, v*b2)``; torch on the CPU
rounds ``(1-b2)*g*g`` first), keys and params within 4 ulps (torch's CPU ``sqrt`` is not
correctly rounded; the kernel's ``sqrt_rn`` and torch on CUDA are)."""
import os
import sys

# Triton fixes its mode when it is imported (and each kernel's when its module is): set the
# interpreter only in a process that has not imported it yet.  Where an earlier test module
# imported it compiled, this module's tests are skipped here and run in a fresh process
# (``finish_module``); setting the variable now would leave this process's kernels
# interpreted and ``triton.language`` compiled, which neither mode's tests can use.
if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from _triton_mode import finish_module  # noqa: E402

from mgup_dist import selection  # noqa: E402
from mgup_dist.kernels.base import KEY_NAN, Bufs, key_of  # noqa: E402
from mgup_dist.kernels.torch_ops import TorchOps  # noqa: E402
from mgup_dist.kernels.triton_cuda import NB, TritonCUDA, _cast, _digit_kernel  # noqa: E402
from mgup_dist.layout import Layout, Segment, whole_layout  # noqa: E402
from mgup_dist.pipeline import GroupStep, run_group  # noqa: E402
from mgup_dist.plan import build_plan  # noqa: E402
from mgup_dist.rules import RULES  # noqa: E402

TRI = TritonCUDA(span=128, block=32)
REF = TorchOps()


def _hp(rule, mode="topk", **kw):
    hp = dict(lr=0.01, betas=(0.9, 0.99) if rule == "lion" else (0.9, 0.999), eps=1e-8, weight_decay=0.1,
              alpha=2.0, gamma=0.5, mode=mode, normalize=False, convention="torch", maximize=False)
    hp.update(kw)
    return hp


def _bufs(rule, sizes, dtype=torch.float32, seed=0, ties=False, state_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    ps, gs, states = [], [], {s: [] for s in RULES[rule].state}
    for n in sizes:
        ps.append(torch.randn(n, generator=gen).to(dtype))
        g = torch.randn(n, generator=gen).to(dtype)
        if ties and n:
            g[: n // 2] = 1.0  # many equal scores
            g[n // 2:: 3] = 0.0  # +0 scores
            g[1::7] = -0.0
        gs.append(g)
        for s in states:
            x = torch.rand(n, generator=gen).to(torch.float64 if dtype == torch.float64 else state_dtype)
            states[s].append(x.zero_() if ties else x)  # equal grads then give equal scores
    n = len(sizes)
    return Bufs(ps, gs, states, [1 - 0.9 ** 3] * n, [1 - 0.999 ** 3] * n)


def _clone(b: Bufs) -> Bufs:
    return Bufs([p.clone() for p in b.params], [g.clone() for g in b.grads],
                {k: [x.clone() for x in v] for k, v in b.states.items()}, list(b.bc1), list(b.bc2))


def _step(backend, rule, bufs, layouts, scope, ratio, hp, cap=None):
    plan = build_plan(layouts, scope, ratio, cap=cap)
    st = GroupStep(RULES[rule], dict(hp), plan, bufs, [True] * len(layouts), torch.device("cpu"), torch.float32,
                   lambda n, d, dev: torch.empty(n, dtype=d))
    run_group(backend, st)
    return plan


def _close(rule, xs, ys, what):
    for x, y in zip(xs, ys):
        if rule == "lion" and x.dtype != torch.float16:
            assert torch.equal(x, y), (what, (x - y).abs().max())
        else:
            eps = torch.finfo(x.dtype).eps
            torch.testing.assert_close(y, x, rtol=4 * eps, atol=0, equal_nan=True, msg=what)


def _compare(rule, sizes, scope, ratio, layouts=None, cap=None, dtype=torch.float32, ties=False,
             state_dtype=torch.float32, **hp_kw):
    hp = _hp(rule, **hp_kw)
    ref = _bufs(rule, sizes, dtype, ties=ties, state_dtype=state_dtype)
    tri = _clone(ref)
    layouts = layouts or [whole_layout(p, i) for i, p in enumerate(ref.params)]
    plan = _step(REF, rule, ref, layouts, scope, ratio, hp, cap)
    _step(TRI, rule, tri, layouts, scope, ratio, hp, cap)
    _close(rule, ref.params, tri.params, "params")
    for s in ref.states:
        if ref.states[s][0].dtype in (torch.bfloat16, torch.float16):  # rounded once here, op by op in torch
            for x, y in zip(ref.states[s], tri.states[s]):
                eps = torch.finfo(x.dtype).eps
                torch.testing.assert_close(y.float(), x.float(), rtol=2 * eps, atol=2 * eps * float(x.abs().max()))
        elif s == "exp_avg" or rule == "lion":
            for x, y in zip(ref.states[s], tri.states[s]):
                assert torch.equal(x, y), s
        else:
            _close(rule, ref.states[s], tri.states[s], s)
    return plan


CASES = [
    ("tensor", [37, 1, 0, 200, 5], 0.3),
    ("shard", [37, 1, 0, 200, 5], 0.5),
    ("global", [50, 130], 0.4),
    ("tensor", [50, 130], 0.0),  # K = 0
    ("tensor", [50, 130], 1.0),  # K = N
]


@pytest.mark.parametrize("rule", ["adamw", "lion"])
@pytest.mark.parametrize("scope,sizes,ratio", CASES)
def test_step_matches_torch_ops(rule, scope, sizes, ratio):
    _compare(rule, sizes, scope, ratio)


@pytest.mark.parametrize("rule", ["adamw", "lion"])
def test_ties_zeros_authors_maximize(rule):
    _compare(rule, [100, 90, 3], "tensor", 0.4, ties=True, convention="authors", maximize=True, lr=3e-3,
             weight_decay=0.07)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", ["adamw", "lion"])
def test_half_params(rule, dtype):
    _compare(rule, [77, 129], "tensor", 0.3, dtype=dtype)


@pytest.mark.parametrize("rule", ["adamw", "lion"])
def test_bf16_params_and_states(rule):
    _compare(rule, [77, 129], "tensor", 0.3, dtype=torch.bfloat16, state_dtype=torch.bfloat16)


def _padded(n_tail):
    """Buffer 0: [pad 3][tensor a][pad 5][tensor b][pad n_tail]; buffer 1: a whole tensor."""
    lay0 = Layout(segments=(Segment("a", 3, 40, 0, 40, (40,)), Segment("b", 48, 20, 0, 20, (20,))), numel=68 + n_tail)
    return [68 + n_tail, 33], [lay0, Layout(segments=(Segment("c", 0, 33, 0, 33, (33,)),), numel=33)]


@pytest.mark.parametrize("mode,scope,normalize", [("topk", "tensor", False), ("cautious", "tensor", True),
                                                  ("topk", "global_approx", False), ("topk", "shard", True)])
def test_padding_and_a_chunk_of_padding_only(mode, scope, normalize):
    """Padding packed after the tensors spills into a chunk of its own (cap 40): no unit there,
    so every per-unit table is the padding slot's.  Padding steps with gamma."""
    sizes, lays = _padded(300)
    plan = _compare("adamw", sizes, scope, 0.3, layouts=lays, cap=40, mode=mode, normalize=normalize)
    if scope != "global_approx":  # one chunk: the whole group
        assert any(c.n_units == 0 and c.pieces for c in plan.chunks), [c.n_units for c in plan.chunks]


@pytest.mark.parametrize("rule", ["adamw", "lion"])
def test_cautious_fused_equals_score_then_apply(rule):
    hp = _hp(rule, mode="cautious")
    ref = _bufs(rule, [70, 1, 33])
    tri = _clone(ref)
    plan = build_plan([whole_layout(p, i) for i, p in enumerate(ref.params)], "tensor", 0.5)
    chunk = plan.chunks[0]
    scratch = torch.empty(chunk.numel)
    REF.score(RULES[rule], dict(hp, state=RULES[rule].state), chunk, ref, scratch)
    t_key = torch.full((chunk.n_units,), 1, dtype=torch.int32)  # key(s) >= 1  <=>  s > 0
    REF.apply(RULES[rule], dict(hp, state=RULES[rule].state), chunk, ref, scratch, t_key, None)
    assert TRI.cautious(RULES[rule], dict(hp, state=RULES[rule].state), chunk, tri, 1) is True
    _close(rule, ref.params, tri.params, "params")


def test_lr_and_bias_corrections_as_device_values():
    """capturable: lr and the bias corrections are 0-d tensors (one table op, the authors'
    step size computed from them on the device)."""
    hp = _hp("adamw", convention="authors")
    ref = _bufs("adamw", [50, 20])
    tri = _clone(ref)
    tri.bc1 = [torch.tensor(x) for x in tri.bc1]
    tri.bc2 = [torch.tensor(x) for x in tri.bc2]
    lays = [whole_layout(p, i) for i, p in enumerate(ref.params)]
    _step(REF, "adamw", ref, lays, "tensor", 0.3, hp)
    _step(TRI, "adamw", tri, lays, "tensor", 0.3, dict(hp, lr=torch.tensor(hp["lr"])))
    for x, y in zip(ref.params, tri.params):
        # lr*sqrt(bc2)/bc1 is fp32 tensor math here, python-double math in the reference
        torch.testing.assert_close(y, x, rtol=2e-7, atol=0)


def _device_bc(bufs, steps):
    """bc1, bc2 as the optimizer makes them with device step counters: 0-d views of one
    [2, n] tensor (1 - [[b1], [b2]] ** steps)."""
    bc = 1 - torch.pow(torch.tensor([[0.9], [0.999]]), torch.tensor(steps, dtype=torch.float32))
    bufs.bc1, bufs.bc2 = list(bc[0].unbind(0)), list(bc[1].unbind(0))
    return bufs


@pytest.mark.parametrize("convention", ["torch", "authors"])
@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
def test_capturable_bias_corrections_read_in_place(convention, lr_kind):
    """Device step counters (capturable): the kernels read the optimizer's bias corrections
    where they are (no table op) and compute the step size from lr, a float or a tensor."""
    hp = _hp("adamw", convention=convention, state=RULES["adamw"].state)
    ref = _device_bc(_bufs("adamw", [50, 20, 7]), [3, 3, 5])
    tri = _clone(ref)
    tri.bc1, tri.bc2 = list(ref.bc1), list(ref.bc2)
    lays = [whole_layout(p, i) for i, p in enumerate(ref.params)]
    chunk = build_plan(lays, "tensor", 0.3).chunks[0]
    assert TRI._scalars(RULES["adamw"], hp, chunk, tri, torch.device("cpu"))["BC_MODE"] == 2
    lr = torch.tensor(hp["lr"]) if lr_kind == "tensor" else hp["lr"]
    _step(REF, "adamw", ref, lays, "tensor", 0.3, dict(hp, lr=lr))
    _step(TRI, "adamw", tri, lays, "tensor", 0.3, dict(hp, lr=lr))
    for x, y in zip(ref.params, tri.params):
        torch.testing.assert_close(y, x, rtol=4 * torch.finfo(torch.float32).eps, atol=0)


@pytest.mark.parametrize("rule", ["adamw", "lion"])
def test_uneven_step_counts_take_a_host_table(rule):
    """Params of one group at different steps (one had no grad once): per-piece bias
    corrections and step sizes from one host-made table."""
    ref = _bufs(rule, [60, 33, 9])
    ref.bc1, ref.bc2 = [1 - 0.9 ** t for t in (3, 2, 7)], [1 - 0.999 ** t for t in (3, 2, 7)]
    lays = [whole_layout(p, i) for i, p in enumerate(ref.params)]
    chunk = build_plan(lays, "tensor", 0.3).chunks[0]
    hp = _hp(rule, convention="authors", state=RULES[rule].state)
    assert TRI._scalars(RULES[rule], hp, chunk, ref, torch.device("cpu"))["BC_MODE"] == 1
    tri = _clone(ref)
    _step(REF, rule, ref, lays, "tensor", 0.3, hp)
    _step(TRI, rule, tri, lays, "tensor", 0.3, hp)
    _close(rule, ref.params, tri.params, "params")


@pytest.mark.parametrize("rule", ["adamw", "lion"])
def test_mixed_dtype_group_stays_on_triton(rule):
    """bf16 / fp16 weights beside fp32 norms and biases, fp32 states: one launch per dtype
    class, the same step as the torch-ops backend."""
    ref = _bufs(rule, [77, 129, 40, 5])
    for i, dt in enumerate((torch.bfloat16, torch.float32, torch.float16, torch.float32)):
        ref.params[i] = ref.params[i].to(dt)
        ref.grads[i] = ref.grads[i].to(dt)
    lays = [whole_layout(p, i) for i, p in enumerate(ref.params)]
    chunk = build_plan(lays, "tensor", 0.3).chunks[0]
    cls = TRI._ours(RULES[rule], chunk, ref)
    assert cls is not None and len(TRI._launches(cls, chunk, torch.device("cpu"))) == 3
    tri = _clone(ref)
    for mode in ("topk", "cautious"):
        _step(REF, rule, ref, lays, "tensor", 0.3, _hp(rule, mode=mode))
        _step(TRI, rule, tri, lays, "tensor", 0.3, _hp(rule, mode=mode))
        _close(rule, ref.params, tri.params, "params " + mode)


def test_vector_loads_chosen_per_piece():
    """A piece at an odd address (a view one element in) takes the scalar loop; the others
    keep the vectorised one, in the same launch."""
    b = _bufs("adamw", [1 + 64, 64, 64])
    b.params[0], b.grads[0] = b.params[0][1:], b.grads[0][1:]
    for s in b.states:
        b.states[s][0] = b.states[s][0][1:]
    lays = [whole_layout(p, i) for i, p in enumerate(b.params)]
    chunk = build_plan(lays, "tensor", 0.5).chunks[0]
    tab = TRI._piece_table(RULES["adamw"], chunk, b, torch.device("cpu"), True)
    assert [int(f) & 1 for f in tab[:, 7]] == [0, 1, 1], tab[:, 7]
    _compare_bufs = _clone(b)
    _step(REF, "adamw", b, lays, "tensor", 0.5, _hp("adamw"))
    _step(TRI, "adamw", _compare_bufs, lays, "tensor", 0.5, _hp("adamw"))
    _close("adamw", b.params, _compare_bufs.params, "params")


def _split_layouts():
    """Tensor a in two pieces in two buffers (a split chunk: one rank here, no communication)."""
    split = (("a", 300),)
    return [Layout(segments=(Segment("a", 2, 150, 0, 300, (300,)), Segment("b", 160, 90, 0, 90, (90,))), numel=260,
                   collective=split),
            Layout(segments=(Segment("a", 0, 150, 150, 300, (300,)), Segment("c", 150, 7, 0, 7, (7,))), numel=157,
                   collective=split)]


SYNC_CASES = {
    "topk": dict(),
    "capturable-float-lr": dict(capturable=True),
    "capturable-authors": dict(capturable=True, convention="authors"),
    "uneven-steps": dict(uneven=True),
    "cpu-tensor-lr": dict(lr_tensor=True),
    "split": dict(split=True),
    "normalize": dict(normalize=True),
    "global": dict(scope="global"),
    "cautious": dict(mode="cautious"),
    "cautious-normalize-capturable": dict(mode="cautious", normalize=True, capturable=True),
    "lion": dict(rule="lion"),
    "lion-uneven-split": dict(rule="lion", uneven=True, split=True),
}


@pytest.mark.parametrize("case", sorted(SYNC_CASES))
def test_steps_make_no_synchronising_copy(case):
    """Steady-state steps (tables cached by the first) of the Triton backend: no factory call
    with a device, no blocking or pageable host-to-device copy, no host read of a device
    value, in every configuration.  The step's device is the CPU here, so any explicit device
    in a factory counts (on CUDA it would be a pageable copy)."""
    from _sync_spy import sync_spy

    cfg = dict(rule="adamw", scope="tensor", mode="topk", normalize=False, convention="torch")
    cfg.update(SYNC_CASES[case])
    rule = cfg["rule"]
    lays = _split_layouts() if cfg.get("split") else None
    b = _bufs(rule, [lay.numel for lay in lays] if lays else [60, 33, 9])
    lays = lays or [whole_layout(p, i) for i, p in enumerate(b.params)]
    plan = build_plan(lays, cfg["scope"], 0.4)
    hp = _hp(rule, mode=cfg["mode"], normalize=cfg["normalize"], convention=cfg["convention"],
             state=RULES[rule].state)
    seen = []
    for step in range(3):
        ts = [step + 3 - (i == 0 and cfg.get("uneven", False)) for i in range(len(b.params))]
        if cfg.get("capturable"):
            _device_bc(b, ts)
        else:
            b.bc1, b.bc2 = [1 - 0.9 ** t for t in ts], [1 - 0.999 ** t for t in ts]
        if cfg.get("lr_tensor"):
            hp["lr"] = torch.tensor(0.01)
        st = GroupStep(RULES[rule], dict(hp), plan, b, [True] * len(lays), torch.device("cpu"), torch.float32,
                       lambda n, d, dev: torch.empty(n, dtype=d))
        with sync_spy() as (bad, calls):
            run_group(TRI, st)
        if step:
            assert not bad, (case, step, bad)
            seen += calls
    if cfg.get("uneven"):
        assert any(c.startswith("torch.tensor") for c in seen), "the spy saw no factory call"


def test_the_sync_spy_sees_factories_and_copies():
    from _sync_spy import sync_spy

    with sync_spy() as (bad, calls):
        torch.tensor(1.0, device="cpu")
        torch.ones(2).to("cpu")
        torch.ones(2).to("cpu", non_blocking=True)
        torch.ones(2).to(torch.float64)
    assert len(bad) == 2 and len(calls) == 3, (bad, calls)


def test_optimizer_steps_make_no_synchronising_copy(monkeypatch):
    """The same through the optimizers (their step counters, bias corrections and lr), with
    the Triton backend on CPU tensors, capturable or not, a param without a grad at first."""
    from _sync_spy import sync_spy

    import mgup_dist.pipeline as pipeline_mod
    from mgup_dist import CMGUPAdamW, MGUPAdamW, MGUPLion

    monkeypatch.setattr(pipeline_mod, "get_backend", lambda *a, **k: TRI)
    for cls in (MGUPAdamW, CMGUPAdamW, MGUPLion):
        for capturable in (False, True):
            gen = torch.Generator().manual_seed(1)
            ps = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (70, 33, 5)]
            opt = cls(ps, lr=1e-3, capturable=capturable)
            for step in range(3):
                for i, p in enumerate(ps):
                    p.grad = None if (step == 0 and i == 1) else torch.randn(p.shape, generator=gen)
                with sync_spy() as (bad, _):
                    opt.step()
                if step:
                    assert not bad, (cls.__name__, capturable, step, bad)


def _keys(n, seed, ties=True):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=gen)
    if ties:
        v = v.round(decimals=1)  # many equal scores
        v[::11] = 0.0
        v[5::13] = -0.0
        v[7::101] = float("nan")
    return key_of(v, torch.int32)


@pytest.mark.parametrize("scope", ["tensor", "shard", "global"])
def test_select_on_the_same_keys_is_the_generic_radix_select(scope):
    """Thresholds and resolved keys bit for bit, with ties at the K-th key, +-0, NaN, K = 0,
    K = N, mostly-zero keys, several pieces per unit at odd offsets (two buffers hold pieces
    of the same tensors) and padding."""
    split = (("a", 300),)  # tensor a in two pieces: a split chunk (on one rank: no communication)
    lay0 = Layout(segments=(Segment("a", 2, 150, 0, 300, (300,)), Segment("b", 160, 90, 0, 90, (90,))), numel=260,
                  collective=split)
    lay1 = Layout(segments=(Segment("a", 0, 150, 150, 300, (300,)), Segment("c", 150, 7, 0, 7, (7,))), numel=157,
                  collective=split)
    cut = False
    for ratio, zeros in ((0.3, False), (0.71, False), (0.0, False), (1.0, False), (0.5, True), (0.97, True)):
        for chunk in build_plan([lay0, lay1], scope, ratio).chunks:
            keys = _keys(chunk.numel, seed=int(ratio * 100))
            if zeros:  # most keys exactly 0 (counted in registers by the passes): the K-th among them
                keys[chunk.numel // 5:] = 0
            a, b = keys.clone(), keys.clone()
            t_ref = selection.threshold(REF, chunk, a)
            t_tri = TRI.select(chunk, b, None, selection.chunk_reduce(chunk))
            assert torch.equal(t_tri, t_ref.to(torch.int32))
            assert torch.equal(a, b), "resolved keys differ"
            cut |= any(int((a == t).sum()) < int((keys == t).sum()) for t in t_ref)
    assert cut, "no tie was cut"


def test_half_rounding_keeps_nan_and_inf():
    """NVIDIA GPUs return the canonical NaN 0x7FFFFFFF (CPUs 0x7FC00000); rounding it to bf16
    with 32-bit integer arithmetic overflowed to -0.0, and 0xFFFFFFFF to +0.0."""

    @triton.jit
    def cast_kernel(x_ptr, y_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(y_ptr + i, _cast(tl.load(x_ptr + i), tl.bfloat16))

    bits = torch.tensor([0x7FFFFFFF, 0xFFFFFFFF - 2**32, 0x7FC00000, 0x7F800000, 0xFF800000 - 2**32, 0x7F7FFFFF,
                         0x3F800000, 0x3F808000, 0x3F818000, 0x00000001, 0x80000000 - 2**32, 0x3FFFFFFF, 0x7F7F7FFF,
                         0x4049ABCD, 0xC049ABCD - 2**32, 0x00800000], dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    y = torch.empty(16, dtype=torch.bfloat16)
    cast_kernel[(1,)](x, y, N=16)
    assert torch.isnan(y[:3]).all(), y[:3]
    assert torch.equal(y[3:5], torch.tensor([float("inf"), -float("inf")], dtype=torch.bfloat16))
    assert torch.equal(y[3:].float(), x[3:].to(torch.bfloat16).float())  # torch rounds to nearest even


def test_digit_choice_counts_past_two_to_the_31():
    """Per-unit histograms are int64: a unit of more than 2**31 elements (a global-scope group
    of a 3B model) gets the right digit and K left."""
    U1 = 2
    hist = torch.zeros(U1, NB, dtype=torch.int64)
    hist[0, 1500] = 3_000_000_000
    hist[0, 1600] = 1_000_000_000
    hist[0, 1700] = 5
    k = torch.tensor([1_000_000_100, 0], dtype=torch.int64)
    st = torch.zeros(4 * U1, dtype=torch.int64)
    _digit_kernel[(U1,)](hist, st, k, U1, FIRST=True, LAST=False, WIDTH=11, NBINS=NB)
    # from the top: 5 keys in bin 1700, 1e9 in 1600: the K-th (1e9+100-th) lies in bin 1500
    assert int(st[0]) == 1500 - NB // 2
    assert int(st[U1]) == 1_000_000_100 - 1_000_000_005


def test_tables_cached_per_chunk():
    """A repeat step reuses the device piece table; a moved buffer gets a new one.  Within one
    step (score, then apply: the same buffers object) the table is taken without a look."""
    b = _bufs("adamw", [70, 33])
    chunk = build_plan([whole_layout(p, i) for i, p in enumerate(b.params)], "tensor", 0.5).chunks[0]
    rule = RULES["adamw"]
    t1 = TRI._piece_table(rule, chunk, b, torch.device("cpu"), True)
    assert TRI._piece_table(rule, chunk, b, torch.device("cpu"), True) is t1
    # the next step's buffers (a step gathers them anew), one of them moved
    b = Bufs(b.params, [b.grads[0], b.grads[1].clone()], b.states, b.bc1, b.bc2)
    t2 = TRI._piece_table(rule, chunk, b, torch.device("cpu"), True)
    assert t2 is not t1 and int(t2[1, 1]) == b.grads[1].data_ptr()


def test_muon_and_float64_fall_back():
    b = _bufs("adamw", [30, 12], dtype=torch.float64)
    chunk = build_plan([whole_layout(p, i) for i, p in enumerate(b.params)], "tensor", 0.3).chunks[0]
    assert TRI.cautious(RULES["adamw"], _hp("adamw"), chunk, b, 1) is False
    assert TRI.cautious(RULES["muon"], dict(momentum=0.9, nesterov=True), chunk, b, 1) is False
    _compare("adamw", [30, 12], "tensor", 0.3, dtype=torch.float64)


finish_module(globals(), __file__, want_interpret=True)  # last: see tests/_triton_mode.py
