"""``python -m reflexd.trainer``: the training subprocess the scheduler starts."""

import os
import sys

from reflexd.trainer.fit import main

status = main()
sys.stdout.flush()
sys.stderr.flush()
# the result is written: skipping the interpreter's teardown of torch (~0.3 s) hands the daemon,
# which waits for this process to exit, its model that much sooner
os._exit(status)
