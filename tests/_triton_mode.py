"""Triton decides at import time whether its own library functions (``tl.sum``, ``tl.cumsum``,
...) are interpreted (TRITON_INTERPRET=1) or compiled, and a process cannot mix the two.  A
test module that needs the other mode than the one this process imported triton in reruns
itself in a fresh process (``fresh_process_test``) and marks its other tests skipped here."""
import os
import subprocess
import sys

import pytest


def interpreted() -> bool:
    """Whether triton (importing it now if needed) runs kernels in its interpreter here."""
    import triton.language as tl

    return type(tl.standard.sum).__name__ == "InterpretedFunction"


def finish_module(namespace: dict, path: str, want_interpret: bool) -> None:
    """Skip the module's tests when this process has the wrong triton mode, and add
    ``test_in_fresh_process`` that runs the module in a process with the right one."""
    ok = interpreted() == want_interpret
    reason = "triton is imported in the other mode in this process: test_in_fresh_process runs this module"
    for name, fn in list(namespace.items()):
        if name.startswith("test_") and callable(fn):
            namespace[name] = pytest.mark.skipif(not ok, reason=reason)(fn)

    @pytest.mark.skipif(ok, reason="this process has the right triton mode: the tests ran here")
    @pytest.mark.timeout(300)
    def test_in_fresh_process():
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        if want_interpret:
            env["TRITON_INTERPRET"] = "1"
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", path], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
        # there, every test but this one runs (this one is skipped)
        summary = r.stdout.strip().splitlines()[-1]
        assert " passed" in summary and "1 skipped" in summary and "failed" not in summary, summary

    namespace["test_in_fresh_process"] = test_in_fresh_process
