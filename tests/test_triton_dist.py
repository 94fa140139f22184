"""The Triton select on 2 real gloo ranks (kernels through Triton's interpreter on CPU
tensors): tensors split across the ranks, one of which a rank holds nothing of (a chunk with no
local piece still enters every collective), ties at the K-th key.  Each rank's selection must
be exactly what one process selects on the whole tensors."""
from importlib.util import find_spec

import pytest
import torch
from dist_utils import run_distributed

from mgup_dist import selection
from mgup_dist.kernels.base import key_of
from mgup_dist.kernels.torch_ops import TorchOps
from mgup_dist.layout import Layout, Segment, whole_layout
from mgup_dist.plan import build_plan

SIZES = {"a": 300, "b": 90, "c": 50, "d": 40}
# (tensor, local_start, length, global_start) per rank and buffer; a and d are split, d wholly on rank 0
PIECES = {0: [("a", 0, 200, 0), ("b", 200, 90, 0), ("d", 290, 40, 0)], 1: [("a", 0, 100, 200), ("c", 100, 50, 0)]}
SPLIT = (("a", 300), ("d", 40))
RATIO = 0.37


def _full_keys(name):
    gen = torch.Generator().manual_seed(ord(name))
    v = torch.randn(SIZES[name], generator=gen).round(decimals=1)  # ties
    v[::9] = 0.0
    return key_of(v, torch.int32)


def _rank(rank, world):
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1"
    from mgup_dist.kernels.triton_cuda import TritonCUDA

    segs = tuple(Segment(t, ls, n, gs, SIZES[t], (SIZES[t],)) for t, ls, n, gs in PIECES[rank])
    numel = sum(n for _, _, n, _ in PIECES[rank])
    lay = Layout(segments=segs, numel=numel, collective=SPLIT)
    plan = build_plan([lay], "tensor", RATIO, cap=20)
    local = torch.empty(numel, dtype=torch.int32)
    for t, ls, n, gs in PIECES[rank]:
        local[ls: ls + n] = _full_keys(t)[gs: gs + n]
    out = {}
    empty_chunks = 0
    for chunk in plan.chunks:
        keys = torch.empty(chunk.numel, dtype=torch.int32)
        for pc in chunk.pieces:
            keys[pc.offset: pc.offset + pc.length] = local[pc.start: pc.start + pc.length]
        empty_chunks += chunk.collective and not chunk.pieces
        t = TritonCUDA(span=64, block=16).select(chunk, keys, None, selection.chunk_reduce(chunk))
        t_ext = torch.cat([t, t.new_full((1,), 2**31 - 1)])
        for pc in chunk.pieces:
            name = next(tn for tn, ls, n, gs in PIECES[rank] if ls == pc.start)
            out[(name, pc.gstart)] = (keys[pc.offset: pc.offset + pc.length] >= t_ext[pc.unit]).tolist()
    return out, empty_chunks


@pytest.mark.skipif(find_spec("triton") is None, reason="needs triton")
@pytest.mark.timeout(600)
def test_split_select_on_two_ranks_equals_one_process(monkeypatch):
    # the ranks import triton while unpickling _rank, before run_distributed's env applies:
    # the interpreter switch must be in the environment they are spawned with
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    results = run_distributed(_rank, 2, timeout=500)
    assert results[1][1] >= 1, "rank 1 held no piece of some collective chunk"
    for name, n in SIZES.items():
        keys = _full_keys(name)
        chunk = build_plan([whole_layout(torch.empty(n), name)], "tensor", RATIO).chunks[0]
        t = selection.threshold(TorchOps(), chunk, keys)
        want = (keys >= t[0]).tolist()
        got = [None] * n
        for out, _ in results:
            for (tn, gs), sel in out.items():
                if tn == name:
                    got[gs: gs + len(sel)] = sel
        assert got == want, name
        assert sum(want) == int(RATIO * n + 1e-9)
