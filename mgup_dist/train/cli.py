"""``mgup-dist train ARGS`` / ``python -m mgup_dist.train ARGS``."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .checkpoint import CheckpointWriteError, NoSpaceError
    from .trainer import CollectiveTimeout, run

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        run(argv)
    except ValueError as e:   # bad input or a refused resume: nothing was changed
        print(f"mgup-dist train: error: {e}", file=sys.stderr, flush=True)
        return 2
    except (CollectiveTimeout, NoSpaceError, CheckpointWriteError) as e:   # the environment failed: one line saying what to do
        print(f"mgup-dist train: error: {e.strerror if isinstance(e, OSError) and e.strerror else e}",
              file=sys.stderr, flush=True)
        return 1
    return 0
