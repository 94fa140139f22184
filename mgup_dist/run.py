"""Run an unmodified training script with the MGUP optimizers registered.

    torchrun --nproc_per_node 8 -m mgup_dist.run train.py --deepspeed ds_config.json ...
    deepspeed --num_gpus 8 --module mgup_dist.run train.py --deepspeed ds_config.json ...
    python -m mgup_dist.run -m my_package.train --deepspeed ds_config.json ...

Registers every integration whose framework is installed (DeepSpeed: ``"optimizer":
{"type": "MGUPAdamW", ...}`` in the JSON config), then runs the script (or, after ``-m``,
the module) as ``__main__`` with ``sys.argv`` exactly as the script expects it: its own
path followed by its arguments.  So an HF Trainer / Accelerate script that takes
``--deepspeed ds_config.json`` gets MGUP from the config alone, without an import.
"""
from __future__ import annotations

import importlib.util
import os
import runpy
import sys
from typing import List, Optional

USAGE = (
    "usage: python -m mgup_dist.run SCRIPT.py [script args...]\n"
    "       python -m mgup_dist.run -m MODULE [module args...]\n"
    "Registers the MGUP optimizers with the installed frameworks (DeepSpeed), then runs the\n"
    "script as __main__ with its own arguments."
)


def register_all() -> List[str]:
    """Register MGUP with every supported framework that is installed; return their names."""
    done = []
    if importlib.util.find_spec("deepspeed") is not None:
        from mgup_dist.integrations.deepspeed import register

        register()
        done.append("deepspeed")
    return done


def _split_launcher_flags(args: List[str]):
    """The DeepSpeed launcher runs ``python -m mgup_dist.run --local_rank=N script.py ...``:
    flags it puts before the script belong to the script, right after its path (where
    ``deepspeed script.py`` would have put them)."""
    lead = []
    while args and (args[0].startswith("--local_rank") or args[0].startswith("--local-rank")):
        flag = args.pop(0)
        lead.append(flag)
        if "=" not in flag and args:
            lead.append(args.pop(0))
    return lead, args


def main(argv: Optional[List[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    launcher_flags, args = _split_launcher_flags(args)
    if args and args[0] == "--":
        args = args[1:]
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if args else 2)
    register_all()
    if args[0] == "-m":
        if len(args) < 2:
            print(USAGE, file=sys.stderr)
            raise SystemExit(2)
        module = args[1]
        sys.argv = [module] + launcher_flags + args[2:]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return
    script = args[0]
    if not os.path.isfile(script):
        raise SystemExit(f"mgup_dist.run: no such script: {script!r}\n{USAGE}")
    sys.argv = [script] + launcher_flags + args[1:]
    # as `python script.py` would: the script's directory first on sys.path
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
