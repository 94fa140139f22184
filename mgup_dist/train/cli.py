"""``mgup-dist train ARGS`` / ``python -m mgup_dist.train ARGS``."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .trainer import run

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        run(argv)
    except ValueError as e:
        print(f"mgup-dist train: error: {e}", file=sys.stderr)
        return 2
    return 0
