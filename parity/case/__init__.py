"""The case: its schema, the loader of case files, and the markers a case carries. Imports parity.core only.
"""
