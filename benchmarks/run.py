"""Run the benchmarks: the same runner as `losskit bench` (see README.md here)."""

import sys

from losskit.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
