"""The kernels' sm_90 machine code, read on the CPU (``mgup_dist.triton_table``): for the
installed Triton and for an older one unpacked beside it (Triton 3.6.0, which GPU images of
torch 2.10/2.11 carry), every kernel has no spills, at most 128 registers, no warp ballot or
popcount (``VOTE``/``POPC``: how some Triton versions lower ``tl.histogram``) in a main loop,
and SASS instructions per element within 1.3x between the two versions.

The older Triton lives in ``~/.cache/mgup_dist_triton/3.6.0`` (``pip install --no-deps
--target DIR triton==3.6.0``; the test tries that once); where it cannot be had the
comparison is skipped with the reason.  Only the compiler runs there, not its interpreter."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from _triton_mode import finish_module, interpreted  # noqa: E402

if not interpreted():
    from mgup_dist import triton_table as TT

OLD = "3.6.0"
OLD_DIR = os.path.join(os.path.expanduser("~"), ".cache", "mgup_dist_triton", OLD)
#: one variant of each kernel function, as a step launches them
NAMES = ("score (AdamW)", "score (AdamW, bf16)", "pass 2 (11 bits)", "digit", "tie count", "resolve", "apply (AdamW)",
         "apply (AdamW, bf16)", "cautious (AdamW)")


def _check(stats):
    for s in stats:
        where = f"{s['kernel']} (Triton {s['triton']})"
        assert not s["spills"], f"{where}: spills to local memory"
        assert s["regs"] <= 128, f"{where}: {s['regs']} registers"
        for lp in s["loops"]:
            assert lp["vote_popc"] == 0, f"{where}: {lp['vote_popc']} VOTE/POPC in a main loop of {lp['n']}"
        if s["kernel"] != "digit":
            assert s["loops"] and s["instr_per_elem"] > 0, f"{where}: no main loop found"


@pytest.fixture(scope="module")
def installed():
    try:
        return TT.collect(None, NAMES)
    except RuntimeError as e:  # no ptxas in this triton install
        pytest.skip(str(e)[:200])


def _old_triton():
    if not os.path.isdir(os.path.join(OLD_DIR, "triton")):
        try:
            r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", OLD_DIR,
                                f"triton=={OLD}"], capture_output=True, text=True, timeout=300)
            why = r.stderr.strip()[-200:] if r.returncode else ""
        except (OSError, subprocess.TimeoutExpired) as e:
            why = str(e)[:200]
        if why:
            pytest.skip(f"Triton {OLD} not in {OLD_DIR} and pip could not fetch it: {why}")
    return OLD_DIR


def test_installed_triton_compiles_lean(installed):
    _check(installed)


def test_oldest_supported_triton_compiles_as_lean_as_the_newest(installed):
    old = TT.collect(_old_triton(), NAMES)
    assert {s["triton"] for s in old} == {OLD}
    _check(old)
    new = {s["kernel"]: s for s in installed}
    for s in old:
        a, b = s["instr_per_elem"], new[s["kernel"]]["instr_per_elem"]
        if a or b:
            assert max(a, b) <= 1.3 * min(a, b), (s["kernel"], OLD, a, new[s["kernel"]]["triton"], b)


finish_module(globals(), __file__, want_interpret=False)  # last: see tests/_triton_mode.py
