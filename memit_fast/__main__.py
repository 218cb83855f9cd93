"""`python -m memit_fast`: the `memit-fast` command (`python -m memit_fast info`: versions,
device, native module)."""

import sys

from .cli import main

sys.exit(main())
