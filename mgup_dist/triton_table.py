"""The Triton kernels' machine code, read without a GPU: each kernel compiled ahead of time for
an H100/H200 (sm_90) by the installed Triton, and by other Triton versions unpacked beside it,
and a table per kernel and version of registers, shared memory, SASS instructions per element
of its main loop, and an estimate of its time on an H100 and an H200 for LLaMA-130M.

    python -m mgup_dist.triton_table                      # the installed Triton
    python -m mgup_dist.triton_table --triton-dir DIR     # and a Triton unpacked in DIR, e.g.
        pip install --no-deps --target ~/.cache/mgup_dist_triton/3.6.0 triton==3.6.0

Triton's wheel ships ``ptxas``, ``cuobjdump`` and ``nvdisasm``: the cubin is real sm_90 code,
its register count and spills those a GPU would run.  A main loop is a backward branch whose
body loads from global memory; "instructions per element" counts its SASS instructions over the
elements one thread handles per iteration (``BLOCK`` / threads).  The estimate per kernel is the
larger of its memory time (bytes per element over the card's streaming bandwidth) and its issue
time (instructions over 4 warp-instructions a clock per SM), for the 134.1M elements of
LLaMA-130M, plus 3 us a launch; fused AdamW is 28 bytes per element at the same bandwidth.  It
ignores atomics' L2 throughput and occupancy: a model, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

__all__ = ["KERNELS", "compile_sm90", "kernel_stats", "collect", "estimate", "sass_loops", "main"]

SPAN, BLOCK = 1 << 15, 1024
ELEMS = 134_105_856  # LLaMA-130M (111 tensors)
#: card: SMs, boost clock (Hz), streaming bandwidth a fused elementwise kernel reaches (B/s)
CARDS = {"H100": (132, 1.98e9, 3.0e12), "H200": (132, 1.98e9, 4.2e12)}
LAUNCH_US = 3.0

P64, I32P = "*i64", "*i32"
_SCORE_SIG = {"tab": P64, "blk": P64, "keys_ptr": I32P, "priv_ptr": I32P, "hist_ptr": P64, "sc_ptr": "*fp32",
              "bc_ptr": "*fp32", "bco_ptr": P64, "c1": "fp32", "c2": "fp32", "b1": "fp32", "one_m_b1": "fp32",
              "b2": "fp32", "one_m_b2": "fp32", "eps": "fp32", "U": "i32", "P": "i32"}
_APPLY_SIG = {"tab": P64, "blk": P64, "keys_ptr": I32P, "t_ptr": I32P, "denom_ptr": "*fp32", "sc_ptr": "*fp32",
              "bc_ptr": "*fp32", "bco_ptr": P64, "lr_ptr": "*fp32", "c1": "fp32", "c2": "fp32", "st": "fp32",
              "lr": "fp32", "decay": "fp32", "b1": "fp32", "one_m_b1": "fp32", "b2": "fp32", "one_m_b2": "fp32",
              "eps": "fp32", "wd": "fp32", "alpha": "fp32", "gamma": "fp32", "t_const": "i32", "U": "i32", "P": "i32"}
_PASS_SIG = {"tab": P64, "blk": P64, "keys_ptr": I32P, "priv_ptr": I32P, "st_ptr": P64, "k_ptr": P64,
             "hist_ptr": P64, "U": "i32"}
_TIE_SIG = {"tab": P64, "blk": P64, "keys_ptr": I32P, "st_ptr": P64, "cnt_ptr": P64, "U": "i32", "U1": "i32"}
_RES_SIG = {"tab": P64, "blk": P64, "keys_ptr": I32P, "st_ptr": P64, "base_ptr": P64, "U": "i32", "U1": "i32"}
_DIGIT_SIG = {"hist_ptr": P64, "st_ptr": P64, "k_ptr": P64, "U1": "i32"}


def _kernels():
    """name -> (kernel, signature, constexprs, bytes per element, share of the elements it
    streams on LLaMA-130M, launches a step).  fp32 AdamW/Lion as a step runs them (the step
    estimate counts those), and bf16 params, grads and states."""
    import triton.language as tl

    from .kernels import triton_cuda as T

    loop = dict(SPAN=SPAN, BLOCK=BLOCK)
    adam = dict(LION=False, AUTHORS=False, MAXIMIZE=False)
    score = dict(G_T=tl.float32, S_T=tl.float32, BC_MODE=0, HIST=True, NBINS=T.NB, SHIFT0=21, **adam, **loop)
    apply = dict(P_T=tl.float32, G_T=tl.float32, S_T=tl.float32, CAUTIOUS=False, HAS_DENOM=False, BC_MODE=0,
                 ST_MODE=0, LR_DEV=False, HAS_WD=True, FMA_STEP=True, **adam, **loop)
    return {
        "score (AdamW)": (T._score_kernel, _SCORE_SIG, score, 24, 1.0, 1),
        "score (Lion)": (T._score_kernel, _SCORE_SIG, dict(score, LION=True), 12, 0.0, 0),
        "score (AdamW, bf16)": (T._score_kernel, _SCORE_SIG, dict(score, G_T=tl.bfloat16, S_T=tl.bfloat16),
                                14, 0.0, 0),
        "pass 2 (11 bits)": (T._pass_kernel, _PASS_SIG,
                             dict(FIRST=False, SHIFT=10, WIDTH=11, NBINS=T.NB, **loop), 4, 1.0, 1),
        "pass 3 (10 bits)": (T._pass_kernel, _PASS_SIG,
                             dict(FIRST=False, SHIFT=0, WIDTH=10, NBINS=T.NB, **loop), 4, 1.0, 1),
        "pass 1 (no score)": (T._pass_kernel, _PASS_SIG,
                              dict(FIRST=True, SHIFT=21, WIDTH=11, NBINS=T.NB, **loop), 4, 0.0, 0),
        "digit": (T._digit_kernel, _DIGIT_SIG, dict(FIRST=False, LAST=True, WIDTH=10, NBINS=T.NB), 0, 0.0, 3),
        "tie count": (T._tie_count_kernel, _TIE_SIG, loop, 4, 0.0, 1),
        "resolve": (T._resolve_kernel, _RES_SIG, loop, 4, 0.0, 1),
        "apply (AdamW)": (T._apply_kernel, _APPLY_SIG, apply, 20, 1.0, 1),
        "apply (Lion)": (T._apply_kernel, _APPLY_SIG, dict(apply, LION=True), 24, 0.0, 0),
        "apply (AdamW, bf16)": (T._apply_kernel, _APPLY_SIG,
                                dict(apply, P_T=tl.bfloat16, G_T=tl.bfloat16, S_T=tl.bfloat16), 12, 0.0, 0),
        "cautious (AdamW)": (T._apply_kernel, _APPLY_SIG, dict(apply, CAUTIOUS=True), 28, 0.0, 0),
    }


KERNELS = ("score (AdamW)", "score (Lion)", "score (AdamW, bf16)", "pass 1 (no score)", "pass 2 (11 bits)",
           "pass 3 (10 bits)", "digit",
           "tie count", "resolve", "apply (AdamW)", "apply (Lion)", "apply (AdamW, bf16)", "cautious (AdamW)")

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRA = re.compile(r"\bBRA\b.*?`?\(?(\.L_x_\d+)")


def sass_loops(sass: str) -> List[Dict]:
    """The loops of ``nvdisasm -c`` output: a backward branch and the instructions from its
    target to it.  Each: instruction count, opcodes counted, whether it loads global memory."""
    instrs, labels, pending = [], {}, []
    for line in sass.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.search(line)
        if m:
            addr = int(m.group(1), 16)
            for lab in pending:
                labels[lab] = addr
            pending = []
            instrs.append((addr, m.group(2)))
    loops = []
    for addr, text in instrs:
        m = _BRA.search(text)
        if m and m.group(1) in labels and labels[m.group(1)] <= addr:
            body = [t for a, t in instrs if labels[m.group(1)] <= a <= addr]
            ops = [re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in body]
            loops.append(dict(n=len(body), ops=ops, global_load=any(o.startswith("LDG") for o in ops),
                              vector=any(o.startswith("LDG") and (".128" in o or ".64" in o) for o in ops)))
    return loops


def _bin(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_sm90(fn, sig: Dict[str, str], consts: Dict):
    """``triton.compile`` for sm_90 as a launch specialises: pointer arguments 16-byte aligned
    (the tensors a step passes are), FMA contraction off, the backend's ``NUM_WARPS`` warps."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .kernels.triton_cuda import NUM_WARPS

    names = list(fn.arg_names)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a, t in sig.items() if t.startswith("*")}
    sig = dict(sig, **{k: "constexpr" for k in consts})
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"enable_fp_fusion": False, "num_warps": NUM_WARPS})


def kernel_stats(name: str) -> Dict:
    """Compile one kernel of ``KERNELS`` for sm_90 with the Triton imported here and read its
    cubin: registers, shared memory, local memory (spills), its main loops."""
    import triton

    fn, sig, consts, nbytes, share, launches = _kernels()[name]
    k = compile_sm90(fn, sig, consts)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        res = subprocess.run([_bin("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_bin("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", res).group(1))
    local = int(re.search(r"LOCAL:(\d+)", res).group(1))
    loops = [lp for lp in sass_loops(sass) if lp["global_load"]]
    main = max((lp for lp in loops if lp["vector"]), key=lambda lp: lp["n"], default=None) \
        or max(loops, key=lambda lp: lp["n"], default=None)
    from .kernels.triton_cuda import NUM_WARPS

    per_thread = BLOCK // (32 * NUM_WARPS)
    spills = local > 0 or bool(re.search(r"\b(STL|LDL)\b", sass))
    return dict(kernel=name, triton=triton.__version__, regs=regs, shared=int(k.metadata.shared), spills=spills,
                loops=[dict(n=lp["n"], vote_popc=sum(o.startswith(("VOTE", "POPC")) for o in lp["ops"]),
                            vector=lp["vector"]) for lp in loops],
                instr_per_elem=(main["n"] / per_thread) if main else 0.0,
                sass_total=sum(1 for _ in _INSTR.finditer(sass)),
                bytes=nbytes, share=share, launches=launches)


def _local_stats(names) -> List[Dict]:
    return [kernel_stats(n) for n in names]


def collect(triton_dir: Optional[str] = None, names=KERNELS, timeout: int = 600) -> List[Dict]:
    """``kernel_stats`` of every kernel with the installed Triton, or (``triton_dir``) with the
    Triton unpacked there, in a subprocess that puts it first on ``PYTHONPATH``."""
    if triton_dir is None:
        return _local_stats(names)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([triton_dir, root, os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", "mgup_dist.triton_table", "--json", "--kernels", *names], env=env,
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"compiling with the Triton in {triton_dir} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def estimate(stats: List[Dict], card: str) -> Dict[str, float]:
    """Estimated microseconds per kernel on ``card`` for LLaMA-130M (see the module doc), the
    step of MGUPAdamW (score, two passes, three digit kernels, tie count, apply) and of
    CMGUPAdamW (the cautious kernel), and fused AdamW's 28 bytes per element."""
    sms, clock, bw = CARDS[card]
    issue = sms * 4 * 32 * clock  # thread-instructions a second
    us = {}
    for s in stats:
        mem = s["bytes"] * ELEMS / bw
        ins = s["instr_per_elem"] * ELEMS / issue
        us[s["kernel"]] = max(mem, ins) * 1e6 + LAUNCH_US
    by = {s["kernel"]: s for s in stats}
    step = sum((us[n] - LAUNCH_US) * by[n]["share"] + LAUNCH_US * by[n]["launches"] for n in by if by[n]["launches"])
    step += 12 * LAUNCH_US / 3  # the step's small torch ops (tie ranks, tables): ~1 us each
    fused = 28 * ELEMS / bw * 1e6 + LAUNCH_US
    out = dict(us, step_mgup=step, step_cmgup=us.get("cautious (AdamW)", 0.0), fused_adamw=fused)
    return out


def main(argv=None) -> List[List[Dict]]:
    ap = argparse.ArgumentParser(prog="python -m mgup_dist.triton_table", description=__doc__.split("\n\n")[0])
    ap.add_argument("--triton-dir", action="append", default=[], help="a folder holding another Triton (repeatable)")
    ap.add_argument("--json", action="store_true", help="print the installed Triton's stats as JSON only")
    ap.add_argument("--kernels", nargs="*", default=list(KERNELS), choices=KERNELS)
    args = ap.parse_args(argv)
    if args.json:
        print(json.dumps(_local_stats(args.kernels)))
        return []
    runs = [collect(None, args.kernels)] + [collect(d, args.kernels) for d in args.triton_dir]
    runs.sort(key=lambda r: [int(x) for x in re.findall(r"\d+", r[0]["triton"])[:3]])
    print(f"{'kernel':20} {'triton':7} {'regs':>4} {'smem B':>7} {'spill':>5} {'SASS/elem':>9} {'VOTE+POPC':>9} "
          f"{'B/elem':>6} {'H100 us':>8} {'H200 us':>8}")
    for run in runs:
        e100, e200 = estimate(run, "H100"), estimate(run, "H200")
        for s in run:
            vp = sum(lp["vote_popc"] for lp in s["loops"])
            spill = "yes" if s["spills"] else "no"
            print(f"{s['kernel']:20} {s['triton']:7} {s['regs']:4d} {s['shared']:7d} {spill:>5} "
                  f"{s['instr_per_elem']:9.1f} {vp:9d} {s['bytes']:6d} {e100[s['kernel']]:8.0f} "
                  f"{e200[s['kernel']]:8.0f}")
    print()
    print(f"{'LLaMA-130M step (est.)':28} {'triton':7} {'H100 us':>8} {'x fused':>8} {'H200 us':>8} {'x fused':>8}")
    for run in runs:
        e100, e200 = estimate(run, "H100"), estimate(run, "H200")
        rows = (("MGUPAdamW", "step_mgup"), ("CMGUPAdamW", "step_cmgup"), ("AdamW(fused=True)", "fused_adamw"))
        for label, key in rows:
            print(f"{label:28} {run[0]['triton']:7} {e100[key]:8.0f} {e100[key] / e100['fused_adamw']:8.2f} "
                  f"{e200[key]:8.0f} {e200[key] / e200['fused_adamw']:8.2f}")
    return runs


if __name__ == "__main__":
    main()
