"""Stage 2, memory: the process as the kernel sees it, without probes.

Owns RSS/PSS timelines (memstat), smaps regions (regions), the allocator's own books
read from /proc/PID/mem (books), RSS split into measured parts and the leak or
fragmentation verdict (reconcile), and the session's periodic sampler (memwatch).
May import: tracer.model, tracer's basics. No bcc.
"""
