"""`python -m declip_keras ...` runs the `declip-keras` command, as `torchrun
-m` and environments without the console script need."""

import sys

from declip_keras.cli import main

sys.exit(main())
