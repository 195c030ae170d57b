"""`natrace agent`'s daemon: discovery, one supervisor per process, the overhead budget,
/metrics for Prometheus and profile pushes to Pyroscope."""
