"""A failed program's cause, read from its log: the first failing rank's exception, never torchrun's report."""

from parity.core.root_cause import root_cause

TORCHRUN = """\
W1208 03:10:00.000000 4101 torch/distributed/run.py:774] Setting OMP_NUM_THREADS environment variable for each process
[rank1]: Traceback (most recent call last):
[rank1]:   File "/src/torchtitan/train.py", line 712, in <module>
[rank1]:     trainer = Trainer(config)
[rank1]:               ^^^^^^^^^^^^^^^
[rank1]:   File "/src/torchtitan/train.py", line 131, in __init__
[rank1]:     assert global_batch_size % (job_config.training.local_batch_size * dp_degree) == 0, (
[rank1]: AssertionError: global batch size must be multiple of local batch size times data-parallel degree (6 % (2 * 2) != 0)
[rank0]: Traceback (most recent call last):
[rank0]:   File "/src/torchtitan/train.py", line 712, in <module>
[rank0]: torch.distributed.DistBackendError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer
E1208 03:10:05.000000 4101 torch/distributed/elastic/multiprocessing/api.py:882] failed (exitcode: 1) local_rank: 0
Traceback (most recent call last):
  File "/venv/bin/torchrun", line 8, in <module>
    sys.exit(main())
             ^^^^^^
torch.distributed.elastic.multiprocessing.errors.ChildFailedError: 
============================================================
torchtitan.train FAILED
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 4102)
============================================================
"""

CHAINED = """\
loading config
Traceback (most recent call last):
  File "train.py", line 3, in <module>
    int("x")
ValueError: invalid literal for int() with base 10: 'x'

The above exception was the direct cause of the following exception:

Traceback (most recent call last):
  File "train.py", line 5, in <module>
    raise RuntimeError("config unreadable") from e
RuntimeError: config unreadable
"""

TERMINATE = """\
[rank0]: step 1 loss 8.07
[rank3]: terminate called after throwing an instance of 'c10::Error'
[rank3]:   what():  CUDA error: an illegal memory access was encountered
[rank0]: Traceback (most recent call last):
[rank0]:   File "train.py", line 9, in <module>
[rank0]: RuntimeError: [gloo] Connection closed by peer
"""


def test_the_first_failing_ranks_exception_not_torchruns_report():
    assert root_cause(TORCHRUN) == ("AssertionError: global batch size must be multiple of local batch size times "
                                    "data-parallel degree (6 % (2 * 2) != 0)")


def test_a_chained_traceback_gives_its_last_exception():
    assert root_cause(CHAINED) == "RuntimeError: config unreadable"


def test_a_cpp_terminate_gives_the_type_and_what():
    assert root_cause(TERMINATE) == "c10::Error: CUDA error: an illegal memory access was encountered"


def test_nothing_that_reads_as_a_failure_gives_none():
    assert root_cause("step 1 loss 8.0\nstep 2 loss 7.9\nCUDA out of memory (pretend)\n") is None
    assert root_cause("") is None
    only_torchrun = TORCHRUN[TORCHRUN.index("E1208"):]
    assert root_cause(only_torchrun) is None  # torchrun's report says that a rank failed, not why


def test_a_long_cause_is_cut_to_one_bounded_line():
    cause = root_cause("Traceback (most recent call last):\n  File \"x\", line 1\nValueError: " + "v" * 5000 + "\n")
    assert cause.startswith("ValueError: vvv") and len(cause) == 500 and cause.endswith("…")
