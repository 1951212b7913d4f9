"""Launchers and assets for running external trainers (torchtitan) under the parity harness."""
