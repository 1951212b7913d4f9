"""What every side shares: errors, paths, reading others' files, the run files (records) and the run
directory's rules, token files, presets, parallel dims, the platform fingerprint and determinism
settings, the process lifeline and the launched-process runner. Imports no other parity package.
"""
