"""The entry module of every rank: `-m parity.rank PLAN.json`, under torchrun or any launcher that sets
torch.distributed's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...).

It notes its parent and arms PR_SET_PDEATHSIG before the slow `import torch`, then checks that the
parent is still the one it started under: a rank whose launcher died before the guard was armed
would otherwise be orphaned for good. Only then does it hand over to parity.rank.train.
"""

import os
import sys
import time

PARENT = os.getppid()  # first, before anything slow: the launcher this rank must die with
STARTED = time.time()  # before the slow imports: the launch records where its start-up went

from parity.core.lifeline import die_with_parent, orphaned  # noqa: E402

die_with_parent()
if orphaned(PARENT):
    sys.exit("parity.rank: its launcher is gone; exiting")

from parity.rank.train import main  # noqa: E402 - deliberately after the guard

sys.exit(main(sys.argv[1], STARTED))
