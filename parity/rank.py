"""torchrun's entry module for every rank: `-m parity.rank PLAN.json`.

It arms PR_SET_PDEATHSIG before the slow `import torch`, then checks that the parent is still
torchrun. A rank whose torchrun died before the guard was armed would otherwise be orphaned for
good. Only then does it hand over to parity.train.
"""

import os
import sys
import time
from pathlib import Path

STARTED = time.time()  # before the slow imports: the launch records where its start-up went

from parity.lifeline import die_with_parent

die_with_parent()
try:
    parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
except OSError:
    parent = b""
if b"torch.distributed.run" not in parent and b"torchrun" not in parent:
    sys.exit("parity.rank: torchrun is gone; exiting")

from parity.train import main  # noqa: E402 - deliberately after the guard

sys.exit(main(sys.argv[1], STARTED))
