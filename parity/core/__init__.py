"""What every side shares: errors, paths, reading others' files, the run files (records) and the run
directory's rules, token files, presets, parallel dims, the platform fingerprint and determinism
settings, the process lifeline and the launched-process runner, the commit under test and parity's
version (provenance) and the commands a person runs (reproduce). Imports no other parity package.
"""
