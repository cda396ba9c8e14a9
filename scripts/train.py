"""Same as `declip-keras train ...`; see `--help`."""

import sys

from declip_keras.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
