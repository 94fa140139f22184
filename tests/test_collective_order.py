"""Which collectives a select issues is decided by the plan alone: on 2 real gloo ranks, for
every backend (plain torch ops, CPU, Triton through its interpreter), the sequence of
all-reduces (shape, dtype) is the same on both ranks — one of which holds nothing of a split
tensor — for random scores, all-equal scores and NaN scores, and for the torch-ops and Triton
backends the same for all three (the CPU's bracket select decides its later passes from
values it has all-reduced: identical on every rank, not fixed by the plan).  A backend's only
way to communicate is the ``reduce`` callable the pipeline hands it (``selection.chunk_reduce``)."""
from importlib.util import find_spec

import pytest
import torch
from dist_utils import run_distributed

SIZES = {"a": 300, "b": 90, "c": 50, "d": 40}
# (tensor, local_start, length, global_start) per rank; a and d are split, d wholly on rank 0
PIECES = {0: [("a", 0, 200, 0), ("b", 200, 90, 0), ("d", 290, 40, 0)], 1: [("a", 0, 100, 200), ("c", 100, 50, 0)]}
SPLIT = (("a", 300), ("d", 40))


def _scores(name, kind):
    gen = torch.Generator().manual_seed(ord(name))
    if kind == "random":
        return torch.randn(SIZES[name], generator=gen)
    if kind == "equal":
        return torch.full((SIZES[name],), 0.5)
    v = torch.randn(SIZES[name], generator=gen)
    v[::3] = float("nan")
    return v


def _rank(rank, world, names):
    return {name: _one_backend(name) for name in names}


def _one_backend(backend_name):
    rank = __import__("torch.distributed", fromlist=["x"]).get_rank()
    import torch.distributed as dist

    from mgup_dist import selection
    from mgup_dist.kernels.base import key_of
    from mgup_dist.layout import Layout, Segment
    from mgup_dist.plan import build_plan

    if backend_name == "triton":
        from mgup_dist.kernels.triton_cuda import TritonCUDA

        backend = TritonCUDA(span=64, block=16)
    elif backend_name == "cpu":
        from mgup_dist.kernels.cpu import CPU

        backend = CPU()
    else:
        from mgup_dist.kernels.torch_ops import TorchOps

        backend = TorchOps()
    seen = []
    real = dist.all_reduce

    def spy(t, *a, **k):  # every all-reduce of the select, whoever issues it
        seen.append((tuple(t.shape), str(t.dtype)))
        return real(t, *a, **k)

    dist.all_reduce = spy
    segs = tuple(Segment(t, ls, n, gs, SIZES[t], (SIZES[t],)) for t, ls, n, gs in PIECES[rank])
    numel = sum(n for _, _, n, _ in PIECES[rank])
    plan = build_plan([Layout(segments=segs, numel=numel, collective=SPLIT)], "tensor", 0.37, cap=20)
    out = {}
    try:
        for kind in ("random", "equal", "nan"):
            seen.clear()
            for chunk in plan.chunks:
                keys = torch.empty(chunk.numel, dtype=torch.int32)
                for pc in chunk.pieces:
                    name = next(tn for tn, ls, n, gs in PIECES[rank] if ls == pc.start)
                    keys[pc.offset: pc.offset + pc.length] = key_of(_scores(name, kind), torch.int32)[pc.gstart: pc.gstart + pc.length]
                selection.select(backend, chunk, keys, None, selection.chunk_reduce(chunk))
            out[kind] = list(seen)
    finally:
        dist.all_reduce = real
    return out


@pytest.mark.timeout(600)
def test_every_rank_issues_the_same_collectives_whatever_it_holds():
    names = ["torch", "cpu"] + (["triton"] if find_spec("triton") is not None else [])
    r0, r1 = run_distributed(_rank, 2, names, timeout=540, env={"TRITON_INTERPRET": "1"})
    assert r0 == r1, (r0, r1)
    for name in names:
        seq = r0[name]
        assert seq["random"], f"{name}: the split tensors must be resolved with all-reduces"
        if name != "cpu":
            assert seq["random"] == seq["equal"] == seq["nan"], (name, seq)
        # the CPU's collective bracket select adds a pass or the tie count from values it has
        # just all-reduced (the same on every rank, checked above), so its sequence may differ
        # from one set of scores to another, never from one rank to another
        if name != "cpu":  # per split chunk: histogram passes, then the tie counts (a vector over all slots)
            assert len(seq["random"]) >= 2 and seq["random"][-1][0][0] >= 2, (name, seq)
