"""The Triton kernels compile for a GPU (sm_90) ahead of time, with no GPU: catches what the
interpreter accepts but the compiler rejects (loop-carried types, early returns, casts), and
checks that the score/apply kernels use IEEE division and square root (no approximations)."""

import pytest

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from _triton_mode import finish_module, interpreted  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

if not interpreted():
    from mgup_dist.kernels import triton_cuda as T

SM90 = GPUTarget("cuda", 90, 32)
LOOP = {"SPAN": 16384, "BLOCK": 1024}


def _ptx(fn, sig, consts):
    sig = dict(sig, **{k: "constexpr" for k in consts})
    try:
        k = triton.compile(ASTSource(fn, sig, consts), target=SM90, options={"enable_fp_fusion": False})
    except RuntimeError as e:  # no ptxas in this triton install: nothing to check here
        if "ptxas" in str(e):
            pytest.skip(str(e)[:200])
        raise
    return k.asm["ptx"]


def test_score_and_apply_compile_with_ieee_math():
    P = "*i64"
    ptx = _ptx(T._score_kernel, {
        "tab": P, "blk": P, "keys_ptr": "*i32", "hist_ptr": "*i32", "bc1": "fp32", "bc1_s": "i32", "bc2": "fp32",
        "bc2_s": "i32", "b1": "fp32", "one_m_b1": "fp32", "b2": "fp32", "one_m_b2": "fp32", "eps": "fp32"},
        dict(G_T=tl.bfloat16, S_T=tl.float32, LION=False, AUTHORS=False, MAXIMIZE=False, BC_TAB=False, NB=4096, **LOOP))
    assert "div.rn.f32" in ptx and "sqrt.rn.f32" in ptx and "div.approx" not in ptx and "div.full" not in ptx
    ptx = _ptx(T._apply_kernel, {
        "tab": P, "blk": P, "keys_ptr": "*i32", "t_ptr": "*i32", "denom_ptr": "*fp32", "bc1": "*fp32", "bc1_s": "i32",
        "bc2": "*fp32", "bc2_s": "i32", "step": "*fp32", "step_s": "i32", "lr": "*fp32", "lr_s": "i32", "b1": "fp32",
        "one_m_b1": "fp32", "b2": "fp32", "one_m_b2": "fp32", "eps": "fp32", "wd": "fp32", "decay_c": "fp32",
        "alpha": "fp32", "gamma": "fp32", "t_const": "i32"},
        dict(P_T=tl.bfloat16, G_T=tl.float32, S_T=tl.float32, LION=False, AUTHORS=False, MAXIMIZE=True, CAUTIOUS=True,
             HAS_DENOM=True, BC_TAB=True, STEP_TAB=True, LR_TAB=True, HAS_WD=True, **LOOP))
    assert "div.rn.f32" in ptx and "sqrt.rn.f32" in ptx and "div.approx" not in ptx


def test_selection_kernels_compile():
    P = "*i64"
    _ptx(T._hist_kernel, {"tab": P, "blk": P, "keys_ptr": "*i32", "prefix_ptr": P, "hist_ptr": "*i32"},
         dict(SHIFT=10, WIDTH=10, **LOOP))
    _ptx(T._tie_count_kernel, {"tab": P, "blk": P, "keys_ptr": "*i32", "t_ptr": "*i32", "cnt_ptr": "*i32"}, LOOP)
    ptx = _ptx(T._resolve_kernel, {"tab": P, "blk": P, "keys_ptr": "*i32", "t_ptr": "*i32", "cnt_ptr": "*i32",
                                   "base_ptr": P, "take_ptr": P}, LOOP)
    assert "ret" in ptx


finish_module(globals(), __file__, want_interpret=False)  # last: see tests/_triton_mode.py
