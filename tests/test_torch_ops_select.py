"""The torch-ops backend's own radix select (``TorchOps.select``: two 16-bit passes, or
12/10/10, 8x4, 4x8 by chunk size; ties resolved in phase 3) selects exactly what the
definition selects: fp32 keys with many ties, +-0 and NaN, whole tensors, padding, one unit
over several pieces, and units split over ranks (FSDP2, gloo)."""
from __future__ import annotations

import _fsdp_workers as W
import pytest
import torch
from dist_utils import run_distributed
from test_scopes import _check

from mgup_dist import plan
from mgup_dist.kernels.base import keys_
from mgup_dist.kernels.torch_ops import TopK, TorchOps
from mgup_dist.layout import Layout, Segment, whole_layout
from mgup_dist.reference import topk_indices
from mgup_dist.selection import choose_digit, chunk_reduce


def _ref(s: torch.Tensor, k: int) -> torch.Tensor:
    m = torch.zeros(s.numel(), dtype=torch.bool)
    m[topk_indices(s, k)] = True
    return m


def _select(ts, lays, scope, ratio):
    be = TorchOps()
    pl = plan.build_plan(lays, scope, ratio, cap=1 << 30)
    masks = [torch.zeros(lay.numel, dtype=torch.bool) for lay in lays]
    widths = set()
    for chunk in pl.chunks:
        scratch = torch.empty(chunk.numel)
        for pc in chunk.pieces:
            scratch[pc.offset: pc.offset + pc.length] = ts[pc.buf].reshape(-1)[pc.start: pc.start + pc.length]
        keys = keys_(scratch)
        sel = be.select(chunk, keys, None, chunk_reduce(chunk))
        assert isinstance(sel, TopK)
        widths.add(tuple(be._select_tables(chunk, keys.device)["widths"]))
        phi = be._phi_topk(dict(alpha=1.0, gamma=0.0), chunk, keys, sel, None, torch.float32)
        for pc in chunk.pieces:
            masks[pc.buf][pc.start: pc.start + pc.length] = phi[pc.offset: pc.offset + pc.length] == 1
    return masks, widths


def _scores(sizes, seed):
    gen = torch.Generator().manual_seed(seed)
    ts = [torch.randn(n, generator=gen).round(decimals=1) for n in sizes]  # many ties
    for t in ts:
        if t.numel() > 5:
            t[::7] = 0.0
            t[1::9] = -0.0
            t[2::31] = float("nan")
    return ts


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("sizes", [[0, 1, 7, 300], [5000, 3, 0, 2000], [700_000, 3]],
                         ids=["tiny", "small", "big"])
def test_lean_select_is_the_definition(sizes, ratio):
    ts = _scores(sizes, len(sizes) + int(100 * ratio))
    seen = set()
    m, w = _select(ts, [whole_layout(t, i) for i, t in enumerate(ts)], "tensor", ratio)
    seen |= w
    for mm, t in zip(m, ts):
        assert torch.equal(mm, _ref(t, plan.num_selected(ratio, t.numel())))
    # one unit over all pieces (global scope, one process)
    m, w = _select(ts, [whole_layout(t, i) for i, t in enumerate(ts)], "global", ratio)
    seen |= w
    cat = torch.cat(ts)
    assert torch.equal(torch.cat(m), _ref(cat, plan.num_selected(ratio, cat.numel())))
    # padded buffers (ZeRO partitions): padding is never selected
    pads = [torch.cat([t, torch.full((3,), 5.0)]) for t in ts]
    lays = [Layout((Segment(i, 0, t.numel(), 0, t.numel(), tuple(t.shape)),) if t.numel() else (), t.numel() + 3)
            for i, t in enumerate(ts)]
    m, w = _select(pads, lays, "tensor", ratio)
    seen |= w
    for mm, t in zip(m, ts):
        assert torch.equal(mm[: t.numel()], _ref(t, plan.num_selected(ratio, t.numel())))
        assert not mm[t.numel():].any()
    assert seen  # the widths used: 16/16 for "big", smaller for the others


def test_all_digit_widths_are_exercised():
    seen = set()
    for sizes in ([0, 1, 7, 300], [5000, 3, 0, 2000], [700_000, 3], [40_000, 40_000]):
        seen |= _select(_scores(sizes, 1), [whole_layout(torch.empty(n), i) for i, n in enumerate(sizes)], "tensor", 0.5)[1]
    assert {(16, 16), (12, 10, 10), (8, 8, 8, 8)} <= seen, seen


def test_choose_digit_from_the_top_equals_the_count_from_the_bottom():
    """``selection.choose_digit`` (count from the top, K still needed) and the lean select's
    column (count from the bottom, N - K to skip, ``searchsorted``) pick the same digit."""
    gen = torch.Generator().manual_seed(3)
    hist = torch.randint(0, 4, (50, 16), generator=gen)
    n = hist.sum(1)
    k = (torch.rand(50, generator=gen) * (n + 1)).long().clamp(max=n)
    b, k_new = choose_digit(hist, k)
    c = hist.cumsum(1)
    r = (n - k.clamp_min(1)).view(-1, 1)
    col = torch.searchsorted(c, r, right=True).view(-1)
    ok = k > 0
    assert torch.equal(b[ok], col[ok])
    assert torch.equal(k_new[ok], (c.gather(1, col.view(-1, 1)).view(-1) - (n - k))[ok])


@pytest.mark.timeout(200)
def test_torch_backend_scopes_under_fsdp2_world2():
    """Units split over two ranks: the histograms and the tie counts of the lean select
    travel in all-reduces; every scope selects exactly as one process would."""
    _check(W.unpack(run_distributed(W.scope_counts, 2, None, "torch", timeout=180)))
