"""The selection of tensors split over 2 real gloo ranks on the CPU backend (the collective
bracket select, and its fallback to the radix select) is the selection of one process, bit
for bit, on adversarial scores: heavy ties, +0.0 and -0.0, NaN and -inf, a constant
tensor, K = 0, K = N and K near N (brackets of 2^32 and 2^64 keys), uneven pieces (several per rank), a rank that holds nothing of a
tensor, float32 and float64, and a sample that sees only the largest keys.  Every rank
makes the same reduce calls, in the same order."""
from __future__ import annotations

import _select_workers as W
import pytest
import torch
from dist_utils import run_distributed
from test_cpu_backend import _definition

from mgup_dist.kernels import cpu as cpu_mod
from mgup_dist.plan import num_selected

S = cpu_mod.SAMPLE


def _case(kinds, sizes, ranges, ratio, dtype=torch.float32, seed=0):
    return dict(kinds=kinds, sizes=sizes, ranges=ranges, ratio=ratio, dtype=dtype, seed=seed)


def _halves(n, cut=None):
    cut = n // 2 if cut is None else cut
    return [(0, 0, cut), (1, cut, n - cut)]


N0 = 3 * S + 77
MIXED = dict(
    kinds=["zeros", "nan", "coarse", "const", "normal", "normal"],
    sizes=[N0, 2 * S + 5, S + 3000, 5000, 100, 2 * S],
    ranges=[
        [(0, 0, 10_000), (1, 10_000, 20_000), (0, 30_000, N0 - 30_000)],  # two pieces on rank 0
        [(1, 0, 2 * S + 5)],  # rank 0 holds nothing of it
        _halves(S + 3000, 7),
        _halves(5000, 4000),
        _halves(100, 1),
        _halves(2 * S, 0),  # rank 0's piece is empty
    ],
)
CASES = [
    _case(ratio=0.5, **MIXED),
    _case(ratio=1e-4, seed=1, **MIXED),
    _case(ratio=1.0, seed=2, **MIXED),
    _case(ratio=0.0, seed=3, **MIXED),
    _case(ratio=0.37, dtype=torch.float64, seed=4, **MIXED),
    # K near N over positive scores: brackets from the lowest key, offsets of all 32 / 64 bits
    _case(["pos", "nan"], [2 * S + 11, S + 5], [_halves(2 * S + 11), _halves(S + 5, 3)], 0.9999),
    _case(["pos", "nan"], [2 * S + 11, S + 5], [_halves(2 * S + 11), _halves(S + 5, 3)], 0.9999, torch.float64),
    # the sample holds the largest keys: the bracket misses, the radix select runs
    _case(["miss", "zeros"], [2 * S + 99, 3000], [_halves(2 * S + 99, S), _halves(3000)], 0.5),
    _case(["miss"], [2 * S + 99], [_halves(2 * S + 99, 5)], 0.01, torch.float64),
]


@pytest.mark.timeout(240)
def test_split_selection_is_one_process_selection():
    res = run_distributed(W.split_select, 2, CASES, timeout=220)
    for ci, case in enumerate(CASES):
        per_rank = [r[ci] for r in res]
        assert per_rank[0]["calls"] == per_rank[1]["calls"], (ci, per_rank[0]["calls"], per_rank[1]["calls"])
        for tid, (kind, n) in enumerate(zip(case["kinds"], case["sizes"])):
            s = W.adversarial_scores(kind, n, case["seed"] + tid, case["dtype"])
            full = torch.zeros(n, dtype=torch.bool)
            covered = torch.zeros(n, dtype=torch.int64)
            for r in per_rank:
                for t, g, m in r["pieces"]:
                    if t == tid:
                        full[g: g + m.numel()] = m
                        covered[g: g + m.numel()] += 1
            assert torch.all(covered == 1), (ci, tid)
            k = num_selected(case["ratio"], n)
            assert torch.equal(full, _definition(s, k)), (ci, tid, kind, int(full.sum()), k)
    calls = [res[0][ci]["calls"] for ci in range(len(CASES))]
    # the bracket select: the sample, the counts with the first histogram, <= 2 more passes
    # for fp32 brackets, the ties; a missed bracket adds the radix select's passes
    assert all(len(c) <= 5 for c in calls[:4]), calls[:4]
    assert len(calls[-2]) > 5 and len(calls[-1]) > 5, calls[-2:]
