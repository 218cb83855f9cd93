"""`python -m memit_fast.eval --data FILE ...`: the `memit-fast eval` command on its own."""

import sys

from ..cli import main

sys.exit(main(["eval", *sys.argv[1:]]))
