"""The device ops of a ``backend="torch"`` step (the NPU path), counted on PyTorch's ``meta``
device with ``mgup_dist.opcount``: a fixed number per param group, whatever the number of
tensors, and only ops from the documented set (``kernels.torch_ops.NPU_OPS``): no sort-based
selection, no host reads.  Meta tensors have no data: these tests take seconds."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mgup_dist.kernels.torch_ops import NPU_OPS
from mgup_dist.opcount import _FREE, OpCounter, count_step, model_params
from mgup_dist.optim import CMGUPAdamW, CMGUPLion, MGUPAdamW, MGUPLion, MGUPMuon

#: LLaMA-130M (111 tensors), one step, after a warm-up step: (host step counter, capturable).
#: Capturable adds the device bias corrections (t += 1, stack, pow, 1 - pow) to AdamW.
TARGETS = {"MGUPAdamW": (60, 60), "MGUPLion": (60, 60), "CMGUPAdamW": (16, 20), "CMGUPLion": (15, 15)}
MAKE = {
    "MGUPAdamW": lambda ps, **kw: MGUPAdamW(ps, lr=1e-3, backend="torch", **kw),
    "MGUPLion": lambda ps, **kw: MGUPLion(ps, lr=1e-4, backend="torch", **kw),
    "CMGUPAdamW": lambda ps, **kw: CMGUPAdamW(ps, lr=1e-3, backend="torch", **kw),
    "CMGUPLion": lambda ps, **kw: CMGUPLion(ps, lr=1e-4, backend="torch", **kw),
}


@pytest.mark.parametrize("capturable", [False, True], ids=["host-step", "capturable"])
@pytest.mark.parametrize("name", sorted(MAKE))
def test_llama130m_step_op_count_is_small_and_independent_of_the_tensor_count(name, capturable):
    counts = {}
    for split in (1, 3):  # 111 vs 333 tensors, the same elements
        res = count_step(lambda ps: MAKE[name](ps, capturable=capturable), model_params("llama130m", split))
        counts[split] = res["total"]
    assert counts[1] == counts[3], counts
    assert counts[1] <= TARGETS[name][capturable], (counts, res["ops"].most_common(12))


def test_muon_newton_schulz_is_batched_per_shape_class_plus_a_fixed_count():
    """Muon's matrices go through Newton-Schulz stacked by shape class (tall ones transposed
    into the wide class): 15 ops a class (5 x bmm, baddbmm, baddbmm), whatever the number of
    matrices; the rest is a fixed count for the two param groups (the matrices, and AdamW
    for the others), the same for 111 and 333 tensors."""
    fixed = {}
    for split in (1, 3):
        ps = model_params("llama130m", split)
        res = count_step(lambda q: MGUPMuon(q, backend="torch"), ps)
        classes = {tuple(sorted(p.shape)) for p in ps if p.ndim == 2}
        assert res["ops"]["aten.bmm"] == 5 * len(classes) and res["ops"]["aten.baddbmm"] == 10 * len(classes), res["ops"]
        fixed[split] = res["total"] - 15 * len(classes)
    assert fixed[1] == fixed[3], fixed
    assert fixed[1] <= 170, fixed


# -------------------------------------------------------------------- the allowed ops
FORBIDDEN = {"kthvalue", "topk", "sort", "argsort", "msort", "_local_scalar_dense", "item", "nonzero", "bincount",
             "masked_select", "unique", "_unique2", "equal", "is_nonzero", "allclose"}


class _Names(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in _FREE and not name.startswith("_record_function"):
            self.seen.add(name)
        if name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])):
            self.seen.add("boolean indexing")
        return func(*args, **(kwargs or {}))


CASES = [
    (MGUPAdamW, {}), (MGUPAdamW, {"capturable": True}), (MGUPAdamW, {"scope": "shard"}),
    (MGUPAdamW, {"scope": "global", "normalize": True}), (MGUPAdamW, {"mask_ratio": 0.0}),
    (MGUPAdamW, {"maximize": True}), (MGUPAdamW, {"convention": "authors"}), (CMGUPAdamW, {}),
    (CMGUPAdamW, {"normalize": True}), (MGUPLion, {}), (CMGUPLion, {}), (MGUPMuon, {}),
]


@pytest.mark.parametrize("cls,kw", CASES, ids=[f"{c.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for c, kw in CASES])
def test_a_device_step_uses_only_the_documented_ops(cls, kw):
    """A step on a non-CPU device (``meta``) calls only ops of ``NPU_OPS``: no sort-based
    selection, no host read (a meta tensor has no value: a read would also fail)."""
    ps = [torch.nn.Parameter(torch.empty(s, device="meta")) for s in [(96, 64), (64,), (300, 7), (1,), (5, 5)]]
    for p in ps:
        p.grad = torch.empty_like(p)
    opt = cls(ps, backend="torch", **kw)
    opt.step()
    with _Names() as rec:
        opt.step()
    assert not rec.seen & (FORBIDDEN | {"boolean indexing"}), rec.seen & FORBIDDEN
    assert rec.seen <= NPU_OPS, sorted(rec.seen - NPU_OPS)


def test_opcounter_counts_foreach_ops_once():
    xs = [torch.empty(3, device="meta") for _ in range(5)]
    with OpCounter("meta") as m:
        torch._foreach_mul_(xs, 2.0)
    assert sum(m.ops.values()) == 1
