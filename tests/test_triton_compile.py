"""The Triton kernels compile for a GPU (sm_90) ahead of time, with no GPU: catches what the
interpreter accepts but the compiler rejects (loop-carried types, early returns, casts), and
checks the generated PTX: IEEE division and square root in score/apply (no approximations),
and vectorised global loads (``ld.global.v4``) in the aligned variants of score and apply."""

import pytest

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from _triton_mode import finish_module, interpreted  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

if not interpreted():
    from mgup_dist.kernels import triton_cuda as T

SM90 = GPUTarget("cuda", 90, 32)
LOOP = {"SPAN": 32768, "BLOCK": 1024}
P = "*i64"


def _ptx(fn, sig, consts):
    sig = dict(sig, **{k: "constexpr" for k in consts})
    try:
        k = triton.compile(ASTSource(fn, sig, consts), target=SM90, options={"enable_fp_fusion": False})
    except RuntimeError as e:  # no ptxas in this triton install: nothing to check here
        if "ptxas" in str(e):
            pytest.skip(str(e)[:200])
        raise
    return k.asm["ptx"]


def _score(aligned, **kw):
    consts = dict(G_T=tl.float32, S_T=tl.float32, LION=False, AUTHORS=False, MAXIMIZE=False, SC_TAB=False, HIST=True,
                  ALIGNED=aligned, NBINS=T.NB, SHIFT0=21, **LOOP)
    consts.update(kw)
    return _ptx(T._score_kernel, {
        "tab": P, "blk": P, "keys_ptr": "*i32", "hist_ptr": "*i64", "sc_ptr": "*fp32", "c1": "fp32", "c2": "fp32",
        "b1": "fp32", "one_m_b1": "fp32", "b2": "fp32", "one_m_b2": "fp32", "eps": "fp32", "U": "i32"}, consts)


def _apply(aligned, **kw):
    consts = dict(P_T=tl.float32, G_T=tl.float32, S_T=tl.float32, LION=False, AUTHORS=False, MAXIMIZE=False,
                  CAUTIOUS=False, HAS_DENOM=False, SC_TAB=False, STEP_TAB=False, LR_DEV=False, HAS_WD=True, FMA_STEP=True,
                  ALIGNED=aligned, **LOOP)
    consts.update(kw)
    return _ptx(T._apply_kernel, {
        "tab": P, "blk": P, "keys_ptr": "*i32", "t_ptr": "*i32", "denom_ptr": "*fp32", "sc_ptr": "*fp32",
        "lr_ptr": "*fp32", "c1": "fp32", "c2": "fp32", "st": "fp32", "decay": "fp32", "b1": "fp32",
        "one_m_b1": "fp32", "b2": "fp32", "one_m_b2": "fp32", "eps": "fp32", "wd": "fp32", "alpha": "fp32",
        "gamma": "fp32", "t_const": "i32", "U": "i32"}, consts)


def test_score_and_apply_use_ieee_math_and_vector_loads():
    for ptx in (_score(True), _apply(True), _apply(True, CAUTIOUS=True, MAXIMIZE=True)):
        assert "div.rn.f32" in ptx and "sqrt.rn.f32" in ptx, "IEEE division and square root"
        assert "div.approx" not in ptx and "div.full" not in ptx and "sqrt.approx" not in ptx
        assert "ld.global.v4" in ptx, "aligned variant: vectorised loads"
    assert "ld.global.v4" not in _apply(False), "unaligned variant: scalar loads"


def test_half_precision_and_device_scalar_variants_compile():
    _score(True, G_T=tl.bfloat16, S_T=tl.bfloat16, SC_TAB=True, LION=True, MAXIMIZE=True)
    _apply(False, P_T=tl.bfloat16, G_T=tl.bfloat16, S_T=tl.bfloat16, LION=True, HAS_DENOM=True, SC_TAB=True,
           STEP_TAB=True, LR_DEV=True, AUTHORS=True, FMA_STEP=False)
    _apply(True, P_T=tl.float16, S_T=tl.float32, CAUTIOUS=True, HAS_WD=False)


def test_selection_kernels_compile():
    for first in (True, False):
        _ptx(T._pass_kernel, {"tab": P, "blk": P, "keys_ptr": "*i32", "st_ptr": P, "k_ptr": P, "hist_ptr": P,
                              "U": "i32"},
             dict(FIRST=first, SHIFT=10, WIDTH=11, ALIGNED=True, NBINS=T.NB, **LOOP))
    for first, last in ((True, False), (False, True)):
        _ptx(T._digit_kernel, {"hist_ptr": P, "st_ptr": P, "k_ptr": P, "U1": "i32"},
             dict(FIRST=first, LAST=last, WIDTH=11, NBINS=T.NB))
    _ptx(T._tie_count_kernel, {"tab": P, "blk": P, "keys_ptr": "*i32", "st_ptr": P, "cnt_ptr": P, "U": "i32",
                               "U1": "i32"}, LOOP)
    ptx = _ptx(T._resolve_kernel, {"tab": P, "blk": P, "keys_ptr": "*i32", "st_ptr": P, "base_ptr": P, "U": "i32",
                                   "U1": "i32"}, LOOP)
    assert "ret" in ptx


finish_module(globals(), __file__, want_interpret=False)  # last: see tests/_triton_mode.py
