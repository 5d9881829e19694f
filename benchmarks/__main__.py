"""``python -m benchmarks [SECTION ...] [--quick] [--readme README.md]``: runs `hf_comet.bench`."""

import sys

from hf_comet.bench import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
