"""pinhook's benchmark (benchmarks/run.py) and the do-nothing webhook it is measured against."""
