"""``python -m imm``: the ``imm`` commands (``imm.cli``), for when the ``imm`` script is not on PATH."""

import sys

from imm.cli import main

sys.exit(main(prog="python -m imm"))
