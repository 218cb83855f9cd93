"""`python -m memit_fast.eval --data FILE ...`: the `memit-fast eval` command on its own."""

import argparse
import sys

from .cli import add_arguments, run

parser = argparse.ArgumentParser(prog="python -m memit_fast.eval", description=__doc__)
add_arguments(parser)
sys.exit(run(parser.parse_args()))
