"""benchmarks/defense_table.py's parts: rows, data, runs, report, verdicts."""
