"""natrace's benchmark: overhead and event throughput side by side with its peers.

`python -m bench [--quick]`; see bench/RESULTS.md for the figures and how they were taken.
"""
