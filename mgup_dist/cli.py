"""``mgup-dist``: one entry point, one subcommand per job.

    mgup-dist train [ARGS]            train LLaMA with an MGUP optimizer (default: tiny model, offline, CPU)
    mgup-dist study SPEC [ARGS]       a grid of train runs (optimizer x lr x seed) and its summary
    mgup-dist plot RUN [RUN ...]      overlay the curves of finished runs
    mgup-dist bench [ARGS]            optimizer step times vs fused AdamW
    mgup-dist bench-selection [ARGS]  selection scope costs on gloo ranks
    mgup-dist counterexample [ARGS]   Zhang et al.'s counterexample: Cautious-Adam vs MGUP-Adam
"""
from __future__ import annotations

import importlib
import sys
from typing import List, Optional

COMMANDS = {
    "train": ("mgup_dist.train.cli", "train LLaMA with an MGUP optimizer (no arguments: tiny model, offline, CPU)"),
    "study": ("mgup_dist.train.study", "optimizer x lr x seed grid of train runs: mean ± std, best lr, plots"),
    "plot": ("mgup_dist.train.plot", "overlay learning-rate, train and validation curves of several runs"),
    "bench": ("mgup_dist.bench", "median optimizer step times and ratios to torch AdamW"),
    "bench-selection": ("mgup_dist.bench_selection", "tensor / shard / global selection cost on gloo ranks"),
    "counterexample": ("mgup_dist.counterexample", "Cautious-Adam fails, MGUP-Adam converges (writes a figure)"),
}


def _usage() -> str:
    lines = ["usage: mgup-dist [--version] COMMAND [ARGS]  (mgup-dist COMMAND --help for its options)", "",
             "commands:"]
    lines += [f"  {name:<16} {doc}" for name, (_, doc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from mgup_dist import __version__

        print(f"mgup-dist {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mgup-dist: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    # Subcommands return an exit code (train, plot) or their results (bench: rows,
    # counterexample: trajectories, for callers in Python); only an int is an exit code.
    try:
        result = module.main(rest)
    except ValueError as e:  # bad user input: one clear line, no traceback
        print(f"mgup-dist {name}: error: {e}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


if __name__ == "__main__":
    sys.exit(main())
