"""Recipe `vit_digits` as one command: `python recipes/vit_digits.py [--fast] [--variants dense,comet] [--set FIELD=VALUE] ...`

Same as `hf-comet train vit_digits ...`; see recipes/README.md for what it trains and writes.
"""

import sys

from hf_comet.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "vit_digits", *sys.argv[1:]]))
