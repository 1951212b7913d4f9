"""parity: numerics parity tests for PyTorch distributed training setups.

`parity.load(RUN)` reads a run directory into pandas DataFrames (parity.runs). It is imported on first
use: every rank imports this package, and a rank needs neither pandas nor the report's readers.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "load":
        from parity.runs import load

        return load
    raise AttributeError(f"module 'parity' has no attribute {name!r}")
