"""The summary table of launch/gpu_checks.sh, from the logs it wrote (standard library only).

    python3 launch/gpu_summary.py OUT_DIR > OUT_DIR/summary.md
    python3 launch/gpu_summary.py --env      nvidia-smi and the python / torch / Triton / numpy versions

Reads OUT_DIR/pytest_cuda.txt, bench.json (``python -m mgup_dist.bench_cuda --json``),
bench_cuda.txt (the profiler's kernel table), train.txt (the ``mgup-dist train`` runs, one
``== train OPTIMIZER`` header each), env.txt and failures (one ``exit CODE: COMMAND`` line per
failed command, 124 = timed out).  A check whose log is missing or unreadable shows as
``not run``: the table always comes out, first.
"""
from __future__ import annotations

import json
import os
import re
import sys
from typing import Dict, List, Optional

STEP_ROWS = ("MGUPAdamW", "CMGUPAdamW", "MGUPLion", "MGUPMuon")
TRAIN_OPTS = ("adamw", "mgup_adamw", "cmgup_adamw")


def _read(out: str, name: str) -> Optional[str]:
    try:
        with open(os.path.join(out, name), errors="replace") as f:
            return f.read()
    except OSError:
        return None


def pytest_counts(text: Optional[str]) -> str:
    """'12 passed, 1 failed, 2 skipped' from pytest's last summary line."""
    if not text:
        return "not run"
    lines = [l for l in text.splitlines() if re.search(r"\d+ (passed|failed|error|skipped|deselected)", l)]
    if not lines:
        return "no result (see pytest_cuda.txt)"
    counts = dict((k, int(n)) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)", lines[-1]))
    parts = [f"{counts.get(k, 0)} {k}" for k in ("passed", "failed")]
    parts += [f"{v} {k}" for k, v in counts.items() if k not in ("passed", "failed")]
    return ", ".join(parts)


def train_tokens(text: Optional[str]) -> Dict[str, Optional[float]]:
    """tokens/s of the last logged window of each run (after warm-up and compilation)."""
    out: Dict[str, Optional[float]] = {o: None for o in TRAIN_OPTS}
    if not text:
        return out
    for block in re.split(r"^== train ", text, flags=re.M)[1:]:
        name = block.split()[0]
        tps = re.findall(r"tokens/s ([\d,]+)", block)
        if tps:
            out[name] = float(tps[-1].replace(",", ""))
    return out


def _ms(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _ratio(x, base) -> str:
    return "-" if x is None or not base else f"{x / base:.2f}x"


def table(out: str) -> List[str]:
    bench_raw = _read(out, "bench.json")
    try:
        bench = json.loads(bench_raw) if bench_raw else None
    except ValueError:
        bench = None
    rows = (bench or {}).get("rows", {})
    failed_rows = (bench or {}).get("failed", {})
    lines = ["# GPU node acceptance run", ""]
    env = _read(out, "env.txt")
    if env:
        first = [l for l in env.splitlines() if l.startswith(("torch ", "triton ", "numpy ", "device ", "python "))]
        if first:
            lines += ["; ".join(first), ""]
    lines += ["| check | result |", "|---|---|"]
    lines.append(f"| CUDA tests (tests/test_cuda.py) | {pytest_counts(_read(out, 'pytest_cuda.txt'))} |")
    sel = (bench or {}).get("select")
    if sel is None:
        sel_s = "not run"
    elif sel.get("ok"):
        sel_s = f"equal, bit for bit ({sel['keys']:,} keys, {sel['units']} units, {sel['chunks']} chunks)"
    else:
        sel_s = "DIFFERENT: " + json.dumps(sel)
    lines.append(f"| select on the GPU's own scores vs the generic select ({(bench or {}).get('model', '-')}) | {sel_s} |")
    base_e, base_g = rows.get("AdamW(fused=True)"), rows.get("AdamW(fused) graph")
    for name in STEP_ROWS:
        e, g = rows.get(name), rows.get(name + " graph")
        why = failed_rows.get(name) or failed_rows.get(name + " graph")
        res = (f"eager {_ms(e)} ms ({_ratio(e, base_e)} fused AdamW), CUDA graph {_ms(g)} ms "
               f"({_ratio(g, base_g)} fused AdamW graph)" if bench else "not run")
        lines.append(f"| step ms, {name} | {res}{'; failed: ' + why if why else ''} |")
    if bench:
        lines.append(f"| step ms, AdamW(fused=True) | eager {_ms(base_e)} ms, CUDA graph {_ms(base_g)} ms |")
        if "Muon+AdamW(torch)" in rows:
            m = rows["Muon+AdamW(torch)"]
            lines.append(f"| step ms, torch.optim.Muon + AdamW(fused) | {_ms(m)} ms (MGUPMuon: {_ratio(rows.get('MGUPMuon'), m)}) |")
    tps = train_tokens(_read(out, "train.txt"))
    base_t = tps.get("adamw")
    for name in TRAIN_OPTS:
        t = tps[name]
        lines.append(f"| tokens/s, 130M model, {name} | " + ("not run / no log line" if t is None else
                     f"{t:,.0f} ({_ratio(t, base_t)} adamw)") + " |")
    fails = [l for l in (_read(out, "failures") or "").splitlines() if l.strip()]
    lines.append(f"| commands that failed (124: timed out) | {len(fails)} |")
    lines.append("")
    if fails:
        lines += ["## Failed commands", ""] + [f"- `{l}`" for l in fails] + [""]
    prof = _read(out, "bench_cuda.txt") or ""
    if "kernels of one" in prof:
        lines += ["## Kernels of one MGUPAdamW step (torch.profiler; full table in bench_cuda.txt)", "", "```"]
        lines += prof[prof.index("kernels of one"):].splitlines()[1:32] + ["```", ""]
    return lines


def env() -> None:
    """What the node has: nvidia-smi, python, torch (+ CUDA), Triton, numpy, the device."""
    import subprocess

    try:
        print(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=10).stdout)
    except (OSError, subprocess.SubprocessError) as e:
        print(f"nvidia-smi: {e}")
    print("python", sys.version.split()[0])
    import numpy
    import torch

    print("torch", torch.__version__, "cuda", torch.version.cuda)
    try:
        import triton

        print("triton", triton.__version__)
    except ImportError:
        print("triton none")
    print("numpy", numpy.__version__)
    print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--env"]:
        env()
        return 0
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        print("usage: gpu_summary.py OUT_DIR (the folder launch/gpu_checks.sh wrote) | gpu_summary.py --env",
              file=sys.stderr)
        return 2
    print("\n".join(table(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
