import os
import pathlib
import sys

# DeepSpeed on this CPU machine: the CPU accelerator, and one cache for the small
# extension it compiles on first use (~80 s once, then reused within and across runs).
_ROOT = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(pathlib.Path.home() / ".cache" / "mgup_dist_torch_extensions"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(pathlib.Path.home() / ".cache" / "mgup_dist_inductor"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(_ROOT / "tests"))


def pytest_collection_modifyitems(config, items):
    """Timeouts are hang guards: every test's pytest timeout (its marker, else setup.cfg's)
    is scaled by ``dist_utils.hang_guard``, as are the waits of spawned process groups."""
    import pytest
    from dist_utils import hang_guard

    default = float(config.getini("timeout") or 0)
    for item in items:
        marker = item.get_closest_marker("timeout")
        seconds = float(marker.args[0]) if marker is not None and marker.args else default
        if seconds:
            item.add_marker(pytest.mark.timeout(hang_guard(seconds)), append=False)
