"""The weight digest assembles each full parameter on one rank from the ranks' boxes: its norm and
sha256 must be bit for bit those of the plain full tensor, in every layout, for the seed's weights
for the skip_seed_load fault's init, and for a weights-ensemble member's perturbed start (which must also
differ from the seed's) (tests/scripts/digest_layouts.py, 4 gloo ranks under
torchrun, untrained weights of the tiny model)."""

import subprocess
import sys
from pathlib import Path

import pytest

from parity.core.process import process_env
from parity.trainers.seed import resolve_seed

SCRIPT = Path(__file__).parent / "scripts" / "digest_layouts.py"


@pytest.mark.slow
def test_digest_in_every_layout_is_the_full_tensors_digest(tmp_path, seed_cache):
    seed = resolve_seed("tiny", 42, "float32", cache=seed_cache).path
    out = tmp_path / "differences.txt"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                           str(SCRIPT), str(seed), str(out)], env=process_env(), capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.read_text() == ""
