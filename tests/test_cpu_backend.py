"""The CPU backend's own paths: the bracket select of large units (sample, counting pass,
candidates; the fallback when the sample misses), block-wise eager phases, the compiled
kernels' precision and parallelism, and the bytes held between steps."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_engine import step_beside_adamw

import mgup_dist
from mgup_dist import bench, selection
from mgup_dist.kernels import cpu as cpu_mod
from mgup_dist.kernels.cpu import CPU
from mgup_dist.kernels.torch_ops import TorchOps
from mgup_dist.memory import held_bytes, state_bytes


def _definition(s: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest of s (NaN lowest, -0.0 == +0.0, ties to the lower index), by a stable
    sort of the float64 values."""
    x = s.to(torch.float64).clone()
    x = x + 0.0
    x[torch.isnan(x)] = -float("inf")
    nan_or_neginf = torch.isnan(s) | (s == -float("inf"))
    # rank NaN below -inf: sort on (value, not-NaN) descending, stably
    order = torch.argsort(-x, stable=True)
    if nan_or_neginf.any():
        isnan = torch.isnan(s)[order]
        order = torch.cat([order[~isnan], order[isnan]])
    mask = torch.zeros(s.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def _scores(kind: str, n: int, gen) -> torch.Tensor:
    s = torch.randn(n, generator=gen)
    if kind == "zeros":  # 40 % exact zeros (+0.0 and -0.0): the K-th key is a heavy tie
        z = torch.rand(n, generator=gen) < 0.4
        s[z] = 0.0
        s[z & (torch.rand(n, generator=gen) < 0.5)] = -0.0
    elif kind == "coarse":  # few distinct values: ties inside the bracket
        s = torch.randint(-20, 20, (n,), generator=gen).float()
    elif kind == "nan":
        s[torch.rand(n, generator=gen) < 0.3] = float("nan")
        s[:100] = -float("inf")
    elif kind == "const":
        s.fill_(1.5)
    return s


@pytest.mark.parametrize("kind", ["normal", "zeros", "coarse", "nan", "const"])
@pytest.mark.parametrize("ratio", [0.0, 1e-5, 0.3, 0.5, 0.999, 1.0])
def test_bracket_select_of_large_units_is_the_definition(kind, ratio):
    gen = torch.Generator().manual_seed(7)
    n = 3 * cpu_mod.SMALL_UNIT + 1234  # above SMALL_UNIT: the bracket path
    s = _scores(kind, n, gen)
    k = selection.num_selected(ratio, n)
    out = torch.zeros(n, dtype=torch.bool)
    selection.topk_mask_(s, k, out)  # the CPU backend: bracket select
    assert torch.equal(out, _definition(s, k)), (kind, ratio)


def test_bracket_select_matches_radix_select_of_many_units():
    """Several units of a chunk, big and small, against the torch-ops backend's radix
    select, bit for bit on the masks."""
    from mgup_dist.layout import Layout, Segment

    gen = torch.Generator().manual_seed(3)
    sizes = [2 * cpu_mod.SMALL_UNIT + 5, 17, cpu_mod.SMALL_UNIT + 1, 300_001, 0]
    entries = {}
    for name, backend in (("cpu", CPU()), ("torch", TorchOps())):
        es = []
        for i, n in enumerate(sizes):
            s = _scores(["zeros", "normal", "coarse", "nan", "normal"][i], n, torch.Generator().manual_seed(i))
            es.append(selection.Entry(Layout((Segment(i, 0, n, 0, n),) if n else (), n), s, torch.zeros(n, dtype=torch.bool)))
        selection.select_masks(es, 0.37, "tensor", backend=backend)
        entries[name] = es
    for a, b in zip(entries["cpu"], entries["torch"]):
        assert torch.equal(a.mask, b.mask)
    del gen


def test_bracket_that_misses_falls_back_exactly():
    """A sample that is not representative (the sampled positions hold the largest keys)
    makes the bracket miss: the result is still the exact top-K."""
    n = 2 * cpu_mod.SMALL_UNIT + 99
    s = torch.randn(n, generator=torch.Generator().manual_seed(0))
    idx = torch.from_numpy(cpu_mod._sample_idx(n).astype(np.int64))
    s[idx] = 100.0 + torch.arange(idx.numel(), dtype=torch.float32)
    for k in (n // 2, n // 100, n - 5):
        out = torch.zeros(n, dtype=torch.bool)
        selection.topk_mask_(s, k, out)
        assert torch.equal(out, _definition(s, k)), k


def test_blocks_cover_every_piece_once(monkeypatch):
    """Eager phases run in blocks of <= BLOCK_ELEMS: the ranges tile the chunk in scratch
    order; an optimizer step with tiny blocks equals one with large blocks bit for bit."""
    monkeypatch.setattr(cpu_mod, "BLOCK_ELEMS", 1000)
    torch.manual_seed(0)
    shapes = [(50, 70), (3,), (0,), (2500,), (999,), (1001,)]
    base = [torch.randn(s, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, dtype=torch.float64) for s in shapes] for _ in range(3)]
    results = []
    for block in (1000, 1 << 20):
        monkeypatch.setattr(cpu_mod, "BLOCK_ELEMS", block)
        for cls in (mgup_dist.MGUPAdamW, mgup_dist.CMGUPAdamW, mgup_dist.MGUPLion, mgup_dist.CMGUPLion):
            ps = [torch.nn.Parameter(b.clone()) for b in base]
            opt = cls(ps, lr=1e-2, weight_decay=0.1)
            for gs in grads:
                for p, g in zip(ps, gs):
                    p.grad = g.clone()
                opt.step()
            results.append((block, cls.__name__, [p.detach().clone() for p in ps]))
            if block == 1000:
                plan = next(iter(opt._plans.values()))[1] if opt._plans else None
                for chunk in (plan.chunks if plan is not None and hasattr(plan, "chunks") else []):
                    blocks = CPU._blocks(chunk)
                    assert all(sum(b - a for _, a, b in blk) <= 1000 for blk in blocks)
                    seen = [(i, a, b) for blk in blocks for i, a, b in blk]
                    for i, pc in enumerate(chunk.pieces):
                        rs = [(a, b) for j, a, b in seen if j == i]
                        assert rs[0][0] == 0 and rs[-1][1] == pc.length
                        assert all(x[1] == y[0] for x, y in zip(rs, rs[1:]))
    small = {name: ps for block, name, ps in results if block == 1000}
    large = {name: ps for block, name, ps in results if block != 1000}
    for name in small:
        for a, b in zip(small[name], large[name]):
            assert torch.equal(a, b), name


# ---------------------------------------------------------------------------- memory
def _shapes_28_percent():
    """LLaMA-60M-like proportions, small: the largest tensor (the embedding) is ~28 % of
    the model, larger than one byte a parameter in 4-byte keys."""
    cfg = bench.LlamaConfig(hidden=64, intermediate=172, layers=1, heads=2, vocab=800)
    shapes = [s for _, s in bench.llama_shapes(cfg)]
    total = sum(int(np.prod(s)) for s in shapes)
    assert 0.25 < max(int(np.prod(s)) for s in shapes) / total < 0.45
    return shapes


@pytest.mark.parametrize("compile_", [False], ids=["eager"])
@pytest.mark.parametrize("name", ["MGUPAdamW", "CMGUPAdamW", "MGUPLion", "CMGUPLion"])
def test_held_bytes_within_one_byte_of_adamw_when_one_tensor_is_28_percent(name, compile_, monkeypatch):
    from mgup_dist import plan

    monkeypatch.setattr(plan, "CHUNK_ELEMS", 4096)  # a model of ~100k params: chunks like 4M of 130M
    shapes = _shapes_28_percent()
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt, base, n = step_beside_adamw(name, ps, compile=compile_)
    assert held_bytes(base) == state_bytes(base)
    assert held_bytes(opt) / n <= held_bytes(base) / n + 1, (held_bytes(opt) / n, held_bytes(base) / n)
    if name.startswith("C"):
        assert held_bytes(opt) == state_bytes(opt)  # cautious keeps no key scratch at all
