"""Recipe `bert_mlm_cls` as one command: `python recipes/bert_mlm_cls.py [--fast] [--variants dense,comet] [--set FIELD=VALUE] ...`

Same as `hf-comet train bert_mlm_cls ...`; see recipes/README.md for what it trains and writes.
"""

import sys

from hf_comet.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "bert_mlm_cls", *sys.argv[1:]]))
