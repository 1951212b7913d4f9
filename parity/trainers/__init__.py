"""The trainers a setup can name: parity's own, `command` and `torchtitan`; their keys, validation,
seed checkpoints, launchers and metric readers.
"""
