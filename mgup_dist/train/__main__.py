"""``python -m mgup_dist.train ARGS``: the same as ``mgup-dist train ARGS``."""
import sys

from .cli import main

sys.exit(main())
