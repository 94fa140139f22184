"""The LLaMA-on-C4 training recipe (``mgup-dist train``) and its offline default.

``run(argv)`` parses and trains (raising ValueError on bad input before any work);
``mgup_dist.train.cli.main`` is the command-line entry; ``plot.main`` overlays runs.
"""
from .config import ENGINES, OPTIMIZER_NAMES, parse  # noqa: F401


def run(argv=None):
    from .trainer import run as _run

    return _run(argv)


__all__ = ["run", "parse", "OPTIMIZER_NAMES", "ENGINES"]
