"""Same as `declip-keras make-tfrecords ...`; see `--help`."""

import sys

from declip_keras.cli import main

if __name__ == "__main__":
    sys.exit(main(["make-tfrecords", *sys.argv[1:]]))
