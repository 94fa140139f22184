"""The Triton backend's kernels against TorchOps, through Triton's interpreter on CPU tensors
(TRITON_INTERPRET=1 is set before triton is imported).  Small spans/blocks so that pieces span
several programs and programs several loop iterations.

Exactness: Lion is bitwise equal to TorchOps (keys, states, params).  AdamW's states are
bitwise equal; its keys agree within 4 ulps and its params within 4 ulps (``_close``), because
torch's CPU ``sqrt`` is not correctly rounded (about 1 in 5 fp32 results differ by 1 ulp from
the exact sqrt, which the kernel's ``sqrt_rn`` and torch on CUDA give).  The selection
primitives are then fed the SAME keys and must agree bit for bit.  float16 params: torch on
CPU rounds the decay factor 1 - lr*wd to float16 before multiplying (not bfloat16, not CUDA's
foreach, which use it in fp32 as the kernel does): params within 4 float16 ulps."""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from _triton_mode import finish_module  # noqa: E402

from mgup_dist.kernels.base import KEY_NAN, Bufs, radix_widths  # noqa: E402
from mgup_dist.kernels.torch_ops import TorchOps  # noqa: E402
from mgup_dist.kernels.triton_cuda import TritonCUDA  # noqa: E402
from mgup_dist.layout import Layout, Segment, whole_layout  # noqa: E402
from mgup_dist.plan import build_plan, num_selected  # noqa: E402
from mgup_dist.rules import RULES  # noqa: E402

TRI = TritonCUDA(span=64, block=32)
REF = TorchOps()


def _hp(rule, convention="torch", **kw):
    hp = dict(lr=0.01, betas=(0.9, 0.99) if rule == "lion" else (0.9, 0.999), eps=1e-8, weight_decay=0.1,
              alpha=2.0, gamma=0.5, convention=convention, maximize=False, state=RULES[rule].state)
    hp.update(kw)
    return hp


def _bufs(rule, tensors, gen, state_dtype=None, ties=False):
    grads, states = [], {s: [] for s in RULES[rule].state}
    for t in tensors:
        g = torch.randn(t.numel(), generator=gen).to(t.dtype)
        if ties and t.numel():
            g[: t.numel() // 2] = 1.0  # many equal scores
            g[t.numel() // 2:: 3] = 0.0  # +0 scores
            g[1::7] = -0.0
        grads.append(g)
        for s in states:
            x = torch.rand(t.numel(), generator=gen).to(state_dtype or torch.float32)
            if ties:  # equal grads then give equal scores
                x.zero_()
            states[s].append(x)
    n = len(tensors)
    return Bufs([t.reshape(-1) for t in tensors], grads, states, [1 - 0.9 ** 3] * n, [1 - 0.999 ** 3] * n)


def _clone(b: Bufs) -> Bufs:
    return Bufs([p.clone() for p in b.params], [g.clone() for g in b.grads],
                {k: [x.clone() for x in v] for k, v in b.states.items()}, list(b.bc1), list(b.bc2))


def _tensors(sizes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen).to(dtype) for n in sizes], gen


def _padded_layouts(tensors):
    """Buffer 0: [pad 3][tensor a 0..40][pad 5][tensor b 0..20][pad 2]; buffer 1: whole."""
    b = tensors[1]
    lay0 = Layout(segments=(Segment("a", 3, 40, 0, 40, (40,)), Segment("b", 48, 20, 0, 20, (20,))), numel=70)
    return [lay0, whole_layout(b, "c")]


def _select(backend, chunk, keys, hist0):
    """A plain radix select driven by the backend's primitives (the pipeline's job)."""
    U = chunk.n_units
    widths = radix_widths(32)
    k = torch.tensor(chunk.k, dtype=torch.int64)
    want = torch.tensor([n for n in chunk.n], dtype=torch.int64) - k + 1  # rank from below of the K-th largest
    prefix = torch.zeros(U, dtype=torch.int64)
    for p, w in enumerate(widths):
        h = hist0 if p == 0 else backend.histogram(chunk, keys, prefix, p)
        c = torch.cumsum(h, 1)
        d = (c < want[:, None]).sum(1).clamp_max((1 << w) - 1)
        below = torch.where(d > 0, c.gather(1, (d - 1).clamp_min(0)[:, None])[:, 0], torch.zeros_like(d))
        want = want - below
        prefix = (prefix << w) | (d - (1 << (w - 1)) if p == 0 else d)
    t_key = torch.where(k > 0, prefix, torch.full_like(prefix, 2**31 - 1)).to(torch.int32)
    return t_key, want  # want: the K-th largest is the want-th of the ties at t_key, from below


def _run(backend, rule, hp, chunk, bufs):
    scratch = torch.empty(max(chunk.numel, 1), dtype=torch.float32)
    keys = scratch.view(torch.int32)
    h0 = backend.score(RULES[rule], hp, chunk, bufs, scratch)
    if h0 is None:
        h0 = backend.histogram(chunk, keys, None, 0)
    return scratch, keys, h0


def _take(chunk, ties, want):
    """Per piece, how many of its ties to keep: the unit's need (ties - want + 1: the ties at
    or above the K-th largest), filled in piece order."""
    total = {}
    for i, pc in enumerate(chunk.pieces):
        total[pc.unit] = total.get(pc.unit, 0) + int(ties[i])
    take, used = [], {}
    for i, pc in enumerate(chunk.pieces):
        if pc.unit < 0:
            take.append(0)
            continue
        need = total[pc.unit] - int(want[pc.unit]) + 1 if chunk.k[pc.unit] else 0
        left = need - used.get(pc.unit, 0)
        t = max(0, min(left, int(ties[i])))
        used[pc.unit] = used.get(pc.unit, 0) + t
        take.append(t)
    return torch.tensor(take, dtype=torch.int64)


def _keys_close(rule, a, b):
    """Lion: bitwise.  AdamW: within 2 ulps (keys of same-sign floats differ by their ulp
    distance), NaN keys in the same places."""
    if rule == "lion":
        assert torch.equal(a, b), "keys differ"
        return
    nan = KEY_NAN(torch.int32)
    assert torch.equal(a == nan, b == nan)
    assert int((a.to(torch.int64) - b.to(torch.int64)).abs().max()) <= 4 if a.numel() else True


def _params_close(rule, ref, tri):
    for x, y in zip(ref, tri):
        if rule == "lion" and x.dtype != torch.float16:
            assert torch.equal(x, y), (x - y).abs().max()
        else:
            eps = torch.finfo(x.dtype).eps
            torch.testing.assert_close(y, x, rtol=4 * eps, atol=0, equal_nan=True)


CASES = [
    ("tensor", [37, 1, 0, 200, 5], 0.3),
    ("shard", [37, 1, 0, 200, 5], 0.5),
    ("tensor", [50, 130], 0.0),  # K = 0
    ("tensor", [50, 130], 1.0),  # K = N
]


def _check_step(rule, scope, sizes, ratio, convention="torch", dtype=torch.float32, ties=False, padded=False, **kw):
    tensors, gen = _tensors(sizes, dtype)
    lays = _padded_layouts(tensors) if padded else [whole_layout(t, i) for i, t in enumerate(tensors)]
    if padded:
        tensors = [torch.randn(70, generator=gen).to(dtype), tensors[1]]
    chunk = build_plan(lays, scope, ratio).chunks[0]
    hp = _hp(rule, convention, **kw)
    b_ref = _bufs(rule, tensors, gen, ties=ties)
    b_tri = _clone(b_ref)

    s_ref, k_ref, h_ref = _run(REF, rule, hp, chunk, b_ref)
    s_tri, k_tri, h_tri = _run(TRI, rule, hp, chunk, b_tri)
    n = chunk.numel
    _keys_close(rule, k_tri[:n], k_ref[:n])
    if rule == "lion":
        assert torch.equal(h_tri, h_ref)
    else:  # the scores may differ by an ulp: the pass-0 histogram of the same keys must agree
        k_tri[:n] = k_ref[:n]
        assert torch.equal(TRI.histogram(chunk, k_tri, None, 0), h_ref)
    assert torch.equal(h_tri.sum(), h_ref.sum())
    k_tri[:n] = k_ref[:n]  # from here on: the SAME keys
    for s in b_ref.states:
        for x, y in zip(b_ref.states[s], b_tri.states[s]):
            assert torch.equal(x, y), s

    t_key, want = _select(REF, chunk, k_ref, h_ref)
    for p in range(1, len(radix_widths(32))):
        prefix = (t_key.to(torch.int64) >> sum(radix_widths(32)[p:]))
        assert torch.equal(TRI.histogram(chunk, k_tri, prefix, p), REF.histogram(chunk, k_ref, prefix, p))
    ties_ref = REF.tie_counts(chunk, k_ref, t_key)
    assert torch.equal(TRI.tie_counts(chunk, k_tri, t_key), ties_ref)
    take = _take(chunk, ties_ref, want)
    if ties:  # some piece keeps only part of its ties: resolve_ties has work to do
        assert bool(((take > 0) & (take < ties_ref)).any())
    REF.resolve_ties(chunk, k_ref, t_key, take)
    TRI.resolve_ties(chunk, k_tri, t_key, take)
    assert torch.equal(k_tri[:n], k_ref[:n]), "resolved keys differ"
    # exactly K selected per unit (the check that the select above is right)
    for u in range(chunk.n_units):
        sel = sum(int((k_ref[pc.offset: pc.offset + pc.length] >= t_key[u]).sum())
                  for pc in chunk.pieces if pc.unit == u)
        assert sel == chunk.k[u]

    denom = kw.pop("_denom", None)
    REF.apply(RULES[rule], hp, chunk, b_ref, s_ref, t_key, denom)
    TRI.apply(RULES[rule], hp, chunk, b_tri, s_tri, t_key, denom)
    _params_close(rule, b_ref.params, b_tri.params)
    for s in b_ref.states:
        for x, y in zip(b_ref.states[s], b_tri.states[s]):
            assert torch.equal(x, y), s
    return chunk


@pytest.mark.parametrize("rule", ["adamw", "lion"])
@pytest.mark.parametrize("scope,sizes,ratio", CASES)
def test_step_matches_torch_ops(rule, scope, sizes, ratio):
    chunk = _check_step(rule, scope, sizes, ratio)
    assert len(chunk.pieces) >= 2


@pytest.mark.parametrize("rule", ["adamw", "lion"])
def test_ties_zeros_authors_maximize(rule):
    _check_step(rule, "tensor", [100, 90, 3], 0.4, convention="authors", ties=True, maximize=True,
                lr=3e-3, weight_decay=0.07)


@pytest.mark.parametrize("rule", ["adamw", "lion"])
def test_padding_pieces(rule):
    chunk = _check_step(rule, "tensor", [40, 20], 0.3, padded=True)
    assert any(pc.unit < 0 for pc in chunk.pieces)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", ["adamw", "lion"])
def test_half_params(rule, dtype):
    _check_step(rule, "tensor", [77, 129], 0.3, dtype=dtype)


def test_nan_keys_and_denominator():
    tensors, gen = _tensors([70, 33])
    chunk = build_plan([whole_layout(t, i) for i, t in enumerate(tensors)], "tensor", 0.5).chunks[0]
    hp = _hp("adamw")
    b_ref = _bufs("adamw", tensors, gen)
    b_ref.grads[0][[3, 40]] = float("nan")
    b_ref.grads[1][5] = float("inf")
    b_tri = _clone(b_ref)
    s_ref, k_ref, _ = _run(REF, "adamw", hp, chunk, b_ref)
    s_tri, k_tri, _ = _run(TRI, "adamw", hp, chunk, b_tri)
    _keys_close("adamw", k_tri[: chunk.numel], k_ref[: chunk.numel])
    assert int((k_tri == KEY_NAN(torch.int32)).sum()) == 3  # 2 NaN grads; inf*u(inf)=inf/inf: NaN
    t_key = torch.tensor([0, -5], dtype=torch.int32)
    denom = torch.tensor([1.5, 3.0])
    REF.apply(RULES["adamw"], hp, chunk, b_ref, s_ref, t_key, denom)
    TRI.apply(RULES["adamw"], hp, chunk, b_tri, s_tri, t_key, denom)
    _params_close("adamw", b_ref.params, b_tri.params)


@pytest.mark.parametrize("rule", ["adamw", "lion"])
def test_cautious_fused_equals_score_then_apply(rule):
    tensors, gen = _tensors([70, 1, 33])
    chunk = build_plan([whole_layout(t, i) for i, t in enumerate(tensors)], "tensor", 0.5).chunks[0]
    hp = _hp(rule)
    b_ref = _bufs(rule, tensors, gen)
    b_tri = _clone(b_ref)
    t_const = 1  # key(s) >= 1  <=>  s > 0
    s_ref, _, _ = _run(REF, rule, hp, chunk, b_ref)
    t_key = torch.full((chunk.n_units,), t_const, dtype=torch.int32)
    REF.apply(RULES[rule], hp, chunk, b_ref, s_ref, t_key, None)
    assert TRI.cautious(RULES[rule], hp, chunk, b_tri, t_const) is True
    _params_close(rule, b_ref.params, b_tri.params)
    for s in b_ref.states:
        for x, y in zip(b_ref.states[s], b_tri.states[s]):
            assert torch.equal(x, y)


def test_lr_and_bias_corrections_as_tensors():
    tensors, gen = _tensors([50, 20])
    chunk = build_plan([whole_layout(t, i) for i, t in enumerate(tensors)], "tensor", 0.3).chunks[0]
    hp = _hp("adamw", convention="authors")
    b_ref = _bufs("adamw", tensors, gen)
    b_tri = _clone(b_ref)
    b_tri.bc1 = [torch.tensor(x) for x in b_tri.bc1]
    b_tri.bc2 = [torch.tensor(x) for x in b_tri.bc2]
    hp_t = dict(hp, lr=torch.tensor(hp["lr"]))
    s_ref, k_ref, h_ref = _run(REF, "adamw", hp, chunk, b_ref)
    s_tri, k_tri, h_tri = _run(TRI, "adamw", hp_t, chunk, b_tri)
    _keys_close("adamw", k_tri[: chunk.numel], k_ref[: chunk.numel])
    t_key = torch.tensor([0, 0], dtype=torch.int32)
    REF.apply(RULES["adamw"], hp, chunk, b_ref, s_ref, t_key, None)
    TRI.apply(RULES["adamw"], hp_t, chunk, b_tri, s_tri, t_key, None)
    for x, y in zip(b_ref.params, b_tri.params):
        # lr*sqrt(bc2)/bc1 is fp32 tensor math here, python-double math in the reference
        torch.testing.assert_close(x, y, rtol=2e-7, atol=0)


def test_tables_cached_per_chunk():
    """A repeat step reuses the device tables (no new host-to-device copy); a moved buffer
    gets a new one and the stale one is dropped."""
    tensors, gen = _tensors([70, 33])
    chunk = build_plan([whole_layout(t, i) for i, t in enumerate(tensors)], "tensor", 0.5).chunks[0]
    b = _bufs("adamw", tensors, gen)
    rule = RULES["adamw"]
    t1 = TRI._piece_table(rule, chunk, b, torch.device("cpu"), True)
    assert TRI._piece_table(rule, chunk, b, torch.device("cpu"), True) is t1
    t0 = TRI._piece_table(rule, chunk, b, torch.device("cpu"), False)
    assert TRI._piece_table(rule, chunk, b, torch.device("cpu"), True) is t1  # kinds do not evict each other
    b.grads[1] = b.grads[1].clone()
    t2 = TRI._piece_table(rule, chunk, b, torch.device("cpu"), True)
    assert t2 is not t1 and int(t2[1, 1]) == b.grads[1].data_ptr()
    assert sum(1 for k in chunk.cache if isinstance(k, tuple) and k[0] == "triton_tab") == 2
    assert TRI._piece_table(rule, chunk, b, torch.device("cpu"), False) is t0


def test_muon_and_float64_fall_back():
    tensors, gen = _tensors([30, 12], dtype=torch.float64)
    chunk = build_plan([whole_layout(t, i) for i, t in enumerate(tensors)], "tensor", 0.3).chunks[0]
    b = _bufs("adamw", tensors, gen, state_dtype=torch.float64)
    assert TRI.cautious(RULES["adamw"], _hp("adamw"), chunk, b, 1) is False
    assert TRI.cautious(RULES["muon"], dict(momentum=0.9, nesterov=True), chunk, b, 1) is False
    assert num_selected(0.3, 30) == 9


finish_module(globals(), __file__, want_interpret=True)  # last: see tests/_triton_mode.py
