"""What every side shares: errors, paths, the run files (records), presets, parallel dims, the
platform fingerprint, the process lifeline and the launched-process runner. Imports no other parity package.
"""
