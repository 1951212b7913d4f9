"""parity: numerics parity tests for PyTorch distributed training setups."""

__version__ = "0.1.0"
