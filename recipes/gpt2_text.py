"""Recipe `gpt2_text` as one command: `python recipes/gpt2_text.py [--fast] [--variants dense,comet] [--set FIELD=VALUE] ...`

Same as `hf-comet train gpt2_text ...`; see recipes/README.md for what it trains and writes.
"""

import sys

from hf_comet.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "gpt2_text", *sys.argv[1:]]))
