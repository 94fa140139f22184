"""Rank functions for the selection of tensors split over ranks (run by ``dist_utils``).

Every rank builds the same full scores (a seed), keeps the ranges of each tensor that the
test's piece map gives it (several per rank, uneven, none at all for some tensors), and
runs phase 2 of the pipeline (``selection.select`` with the plan's reduce) on the CPU
backend.  It returns its masks per range and the sequence of reduce calls it made, for
the test to compare with one process's selection and across ranks.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from mgup_dist import selection
from mgup_dist.kernels.cpu import CPU
from mgup_dist.layout import Layout, Segment
from mgup_dist.plan import build_plan
from mgup_dist.radix import keys_

Ranges = Sequence[Tuple[int, int, int]]  # (rank, global start, length)


def adversarial_scores(kind: str, n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Scores that make the K-th value hard: heavy ties, +-0, NaN, -inf, constants, and a
    sample that sees only the largest values (the bracket misses)."""
    from mgup_dist.kernels import cpu as cpu_mod

    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(n, generator=gen, dtype=torch.float64)
    if kind == "zeros":  # 40 % exact zeros, half of them -0.0: the K-th key is a heavy tie
        z = torch.rand(n, generator=gen) < 0.4
        s[z] = 0.0
        s[z & (torch.rand(n, generator=gen) < 0.5)] = -0.0
    elif kind == "coarse":  # few distinct values: ties inside the bracket
        s = torch.randint(-20, 20, (n,), generator=gen).to(torch.float64)
    elif kind == "nan":
        s[torch.rand(n, generator=gen) < 0.3] = float("nan")
        s[:100] = -float("inf")
    elif kind == "const":
        s.fill_(1.5)
    elif kind == "pos":  # all positive: a bracket from the lowest key to a positive one spans 2^bits keys
        s = s.abs() + 0.5
    elif kind == "miss" and n > cpu_mod.SAMPLE:  # the sampled positions hold the largest keys
        idx = torch.from_numpy(cpu_mod._sample_idx(n).astype(np.int64))
        s[idx] = 100.0 + torch.arange(idx.numel(), dtype=torch.float64)
    return s.to(dtype)


def split_select(rank: int, world: int, cases: List[Dict]) -> List[Dict]:
    """For each case (``kinds``, ``sizes``, ``ranges`` per tensor, ``ratio``, ``dtype``,
    ``seed``): this rank's masks per range and its reduce calls ``(numel, dtype)``."""
    out = []
    backend = CPU()
    for case in cases:
        dtype = case["dtype"]
        scores = [adversarial_scores(k, n, case["seed"] + i, dtype) for i, (k, n) in enumerate(zip(case["kinds"], case["sizes"]))]
        layouts, bufs, mine = [], [], []
        for tid, (n, ranges) in enumerate(zip(case["sizes"], case["ranges"])):
            own = [(g, ln) for r, g, ln in ranges if r == rank]
            segs, at = [], 0
            for g, ln in own:
                segs.append(Segment(tid, at, ln, g, n))
                at += ln
            layouts.append(Layout(tuple(s for s in segs if s.length), at, None, ((tid, n),)))
            bufs.append(torch.cat([scores[tid][g: g + ln] for g, ln in own]) if own else scores[tid][:0].clone())
            mine.append(own)
        plan = build_plan(layouts, "tensor", case["ratio"])
        masks = [torch.zeros(b.numel(), dtype=torch.bool) for b in bufs]
        calls = []
        for chunk in plan.chunks:
            c = chunk.active([True] * len(bufs))
            scratch = torch.empty(c.numel, dtype=dtype)
            for pc in c.pieces:
                scratch[pc.offset: pc.offset + pc.length].copy_(bufs[pc.buf][pc.start: pc.start + pc.length])
            keys = keys_(scratch)
            base = selection.chunk_reduce(c)

            def reduce(t, base=base):
                calls.append((t.numel(), str(t.dtype)))
                return base(t)

            t = selection.select(backend, c, keys, None, reduce)
            t_ext = torch.cat([t, t.new_full((1,), torch.iinfo(keys.dtype).max)])
            for pc in c.pieces:
                torch.ge(keys[pc.offset: pc.offset + pc.length], t_ext[pc.unit], out=masks[pc.buf][pc.start: pc.start + pc.length])
        pieces = []
        for tid, own in enumerate(mine):
            at = 0
            for g, ln in own:
                pieces.append((tid, g, masks[tid][at: at + ln].clone()))
                at += ln
        out.append({"pieces": pieces, "calls": calls})
    return out
