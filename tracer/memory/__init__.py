"""Stage 2, memory: the process as the kernel sees it, without probes.

Owns RSS/PSS timelines (memstat), smaps regions (regions), the RSS reconciliation
against traced bytes (reconcile) and the session's periodic sampler (memwatch).
May import: tracer.model, tracer's basics. No bcc.
"""
