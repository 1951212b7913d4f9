"""What a person reads: figures, report.md/report.html, regression pages and PR evidence.
"""
