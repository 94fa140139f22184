"""The CPU step's C++ kernels (``mgup_dist.kernels.cpu_ext``): the default eager step of
MGUP-AdamW / -Lion (top-K and cautious) on float32 CPU tensors.

* bit for bit the torch-ops path it replaces (params and every state), over the variants
  (weight decay, maximize, the authors' convention, normalize, scope shard, cautious),
  with large units (the histogram and the counting pass), crowded bins (many exact-zero
  gradients: the K-th key's ties resolved to the lower index) and NaN/inf scores;
* it is the path taken by default (call counts);
* one thread pool: a step starts no Python threads;
* no compiler: one warning and the torch-ops path, with the same results.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading

import pytest
import torch

import mgup_dist
from mgup_dist.kernels import cpu_ext

pytestmark = pytest.mark.skipif(not cpu_ext.available(), reason="the CPU kernels cannot be built here (no C++ compiler)")

# 300x700 and 70001: large units (histogram + counting pass); 400_000: a crowded bin when
# 80 % of its gradients are zero; the rest: small units, one element, padding-free tails
SHAPES = [(300, 700), (3,), (1000,), (70_001,), (129, 33), (5,), (400_000,)]


def _run(use_ext: bool, cls, kw, steps=4, zeros=False, special=False):
    ext = cpu_ext.load()
    saved = dict(cpu_ext._state)
    cpu_ext._state.update(mod=ext if use_ext else None, done=True)
    try:
        gen = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
        opt = cls(ps, **kw)
        for i in range(steps):
            for p in ps:
                g = torch.randn(p.shape, generator=gen)
                flat = g.view(-1)
                if i == 1:
                    flat[::7] = 0.0
                    flat[1::7] = -0.0
                if zeros and i >= 2:
                    flat[: int(flat.numel() * 0.8)] = 0.0
                if special and i == 3 and flat.numel() > 10:
                    flat[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
                p.grad = g
            opt.step()
        return [p.detach().clone() for p in ps], [{k: v.clone() for k, v in opt.state[p].items()} for p in ps]
    finally:
        cpu_ext._state.update(saved)


VARIANTS = [
    dict(lr=1e-2, weight_decay=0.1),
    dict(lr=1e-2, maximize=True),
    dict(lr=1e-3, convention="authors", weight_decay=0.01),
    dict(lr=1e-2, normalize=True),
    dict(lr=1e-2, mask_ratio=0.3, scope="shard"),
    dict(lr=1e-2, mask_ratio=0.999),
    dict(lr=1e-2, mask_ratio=1e-4),
]


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("cls", [mgup_dist.MGUPAdamW, mgup_dist.CMGUPAdamW, mgup_dist.MGUPLion, mgup_dist.CMGUPLion],
                         ids=lambda c: c.__name__)
def test_kernels_equal_the_torch_ops_path_bit_for_bit(cls, kw):
    if cls.__name__.startswith("C") and "mask_ratio" in kw:
        pytest.skip("cautious rules have no mask_ratio")
    a, sa = _run(True, cls, kw)
    b, sb = _run(False, cls, kw)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    for x, y in zip(sa, sb):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(torch.as_tensor(x[k]), torch.as_tensor(y[k])), k


@pytest.mark.parametrize("cls", [mgup_dist.MGUPAdamW, mgup_dist.MGUPLion], ids=lambda c: c.__name__)
@pytest.mark.parametrize("ratio", [0.5, 0.9, 0.05])
def test_crowded_bins_and_ties_equal_the_torch_ops_path(cls, ratio):
    """80 % zero gradients: scores of exactly 0 (and -0) crowd the K-th key's bin; the
    narrowing passes and the tie cut-off (lower index wins) must match."""
    a, _ = _run(True, cls, dict(lr=1e-2, mask_ratio=ratio), zeros=True)
    b, _ = _run(False, cls, dict(lr=1e-2, mask_ratio=ratio), zeros=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("cls", [mgup_dist.MGUPAdamW, mgup_dist.CMGUPLion], ids=lambda c: c.__name__)
def test_nan_and_inf_scores_equal_the_torch_ops_path(cls):
    a, _ = _run(True, cls, dict(lr=1e-2), special=True)
    b, _ = _run(False, cls, dict(lr=1e-2), special=True)
    for x, y in zip(a, b):
        assert torch.equal(x.isnan(), y.isnan()) and torch.equal(torch.nan_to_num(x, 7.0), torch.nan_to_num(y, 7.0))


def test_default_step_takes_the_kernels_and_starts_no_threads():
    """``MGUPAdamW(params)`` with no argument: phase 1-3 in C++ (top-K without keys for
    whole tensors), cautious in one pass; no Python thread is started by a step (the kernels
    run on torch's intra-op threads)."""
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(300, 700), (17,)]]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    before = {t.ident for t in threading.enumerate()}
    cpu_ext.calls.clear()
    mgup_dist.MGUPAdamW(ps).step()
    mgup_dist.CMGUPAdamW(ps).step()
    mgup_dist.MGUPLion(ps).step()
    assert dict(cpu_ext.calls) == {"topk_score": 2, "topk_select": 2, "topk_apply": 2, "cautious": 1}
    assert {t.ident for t in threading.enumerate()} == before


def test_float64_selects_in_cpp_and_other_dtypes_keep_their_path():
    """float64 params: the torch-ops phases, the select of whole tensors in C++ (int64 keys);
    bf16: the torch-ops phases (no kernel call)."""
    gen = torch.Generator().manual_seed(0)
    for dtype, want in ((torch.float64, {"select": 1}), (torch.bfloat16, {"select": 1})):
        p = torch.nn.Parameter(torch.randn(300, 700, generator=gen).to(dtype))
        p.grad = torch.randn(300, 700, generator=gen).to(dtype)
        cpu_ext.calls.clear()
        mgup_dist.MGUPAdamW([p]).step()
        assert dict(cpu_ext.calls) == want, dtype


@pytest.mark.timeout(600)
def test_no_compiler_warns_once_and_steps_on_the_torch_ops_path(tmp_path):
    """A machine without a C++ compiler (CXX points nowhere, a fresh extensions folder): one
    warning naming the cause, then the same step as before."""
    code = (
        "import warnings, torch, mgup_dist\n"
        "from mgup_dist.kernels import cpu_ext\n"
        "p = torch.nn.Parameter(torch.ones(100_000)); p.grad = torch.linspace(-1, 1, 100_000)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    opt = mgup_dist.MGUPAdamW([p]); opt.step(); opt.step()\n"
        "msgs = [str(x.message) for x in w if 'CPU kernels' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert cpu_ext.load() is None and not cpu_ext.calls\n"
        "import hashlib; print(msgs[0]); print(hashlib.sha1(p.detach().numpy().tobytes()).hexdigest())\n"
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=580)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "could not be built" in out.stdout
    # the same step with the kernels, in this process
    p = torch.nn.Parameter(torch.ones(100_000))
    p.grad = torch.linspace(-1, 1, 100_000)
    opt = mgup_dist.MGUPAdamW([p])
    opt.step()
    opt.step()
    assert out.stdout.strip().splitlines()[-1] == hashlib.sha1(p.detach().numpy().tobytes()).hexdigest()
