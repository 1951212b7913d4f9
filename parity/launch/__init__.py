"""Launchers: how the ranks of a setup are started and taken down.

- process: run one launched program with a per-setup timeout, its logs, and a teardown that leaves
  nothing behind (every launcher goes through it).
- torchrun: one torchrun over the setups a plan puts together, on this node.
- nodes: the same launches across nodes, torchrun's c10d rendezvous hosted by node 0's `parity`.
- channel: the signed messages between those nodes, and where their secret comes from.
- slurm: the job script that starts one `parity run` per node under SLURM.
"""
