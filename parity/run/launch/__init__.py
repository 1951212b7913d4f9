"""Launchers: how the ranks of a setup are started and taken down.

- torchrun: one torchrun over the setups a plan puts together, on this node.
- nodes: the same launches across nodes, torchrun's c10d rendezvous hosted by node 0's `parity`.
- channel: the signed messages between those nodes, and where their secret comes from.
- slurm: the job script that starts one `parity run` per node under SLURM.
"""
