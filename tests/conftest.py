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
