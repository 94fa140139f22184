"""``mgup_dist.collectives`` on 2 real gloo ranks: the sums and maxima, and the exit hook.

A gloo collective's tensors are released by a worker thread of the group after ``wait()``
has returned; without the hook a script that ends right after its last collective aborts in
about one run of ten (``examples/fsdp2.py``: "terminate called without an active exception":
Python ends the worker while it waits for the GIL during finalization).  The first
collective on a gloo group registers one exit hook that gives up the GIL before finalization."""
import atexit

import torch
from dist_utils import run_distributed


def _rank(rank, world):
    from mgup_dist import collectives

    before = atexit._ncallbacks()
    s = collectives.all_reduce_sum(torch.tensor([rank + 1, 10 * rank], dtype=torch.int64))
    m = collectives.all_reduce_max(torch.tensor([float(rank), -float(rank)]))
    collectives.all_reduce_sum(torch.zeros(3))
    return s.tolist(), m.tolist(), atexit._ncallbacks() - before


def test_gloo_sum_max_and_one_exit_hook():
    for s, m, hooks in run_distributed(_rank, 2):
        assert s == [3, 10]
        assert m == [1.0, -0.0]
        assert hooks == 1


def test_one_rank_is_a_no_op_without_hook():
    from mgup_dist import collectives

    before = atexit._ncallbacks()
    t = torch.tensor([2.0, 3.0])
    assert collectives.all_reduce_sum(t) is t and t.tolist() == [2.0, 3.0]
    assert collectives.all_reduce_max(t).tolist() == [2.0, 3.0]
    assert atexit._ncallbacks() == before
