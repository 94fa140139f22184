"""``python tests/_with_megatron_shim.py SCRIPT [args]``: run SCRIPT as ``__main__`` after
installing ``megatron_cpu_shim`` (megatron-core on CPU; tests only)."""
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import megatron_cpu_shim  # noqa: E402

megatron_cpu_shim.install()
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name="__main__")
