"""``mgup-dist train ARGS`` / ``python -m mgup_dist.train ARGS``."""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from typing import Optional, Sequence

__all__ = ["main"]


def _report(msg: str) -> None:
    """``mgup-dist train: error: MSG`` on stderr, once.  Under torchrun every rank usually
    fails the same check: rank 0 prints at once (so the line comes first, before torchrun's
    failure summary and its traceback); another rank prints, with its rank, only a message
    rank 0 has not printed on this node (it waits a moment to know)."""
    rank = int(os.environ.get("RANK", "0") or 0)
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id is None or int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        print(f"mgup-dist train: error: {msg}", file=sys.stderr, flush=True)
        return
    digest = hashlib.sha256(f"{run_id}\0{msg}".encode()).hexdigest()[:24]
    marker = os.path.join(tempfile.gettempdir(), f"mgup_dist_error_{digest}")
    if rank == 0:
        print(f"mgup-dist train: error: {msg}", file=sys.stderr, flush=True)
        try:
            open(marker, "w").close()
        except OSError:
            pass
        return
    time.sleep(1.0)
    if not os.path.exists(marker):
        print(f"mgup-dist train: error (rank {rank}): {msg}", file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .checkpoint import CheckpointWriteError, NoSpaceError
    from .trainer import CollectiveTimeout, run

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        run(argv)
    except ValueError as e:   # bad input or a refused resume: nothing was changed
        _report(str(e))
        return 2
    except (CollectiveTimeout, NoSpaceError, CheckpointWriteError) as e:   # the environment failed: one line saying what to do
        _report(e.strerror if isinstance(e, OSError) and e.strerror else str(e))
        return 1
    return 0
