"""Judging run files: numbers, per-pair lanes, localisation, ensembles, baselines. No torch.distributed.
"""
