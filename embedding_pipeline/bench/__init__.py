"""Benchmarks behind ``embedding-pipeline bench``: each prints its figures and the baselines measured in the
same run, so ratios — not absolute numbers from another machine — carry the conclusion."""
