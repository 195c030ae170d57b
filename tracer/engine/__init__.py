"""Stage 3, engine: runs a tracing session and turns raw probe figures into the model.

Owns the session (probes + memory watch + poll loop), the aggregator (allocation sites),
the triage and handle builders, growth over time, the live worker behind `top`, and the
mmap bookkeeping. The only stage that drives the others.
May import: tracer.probes, tracer.symbols, tracer.memory, tracer.model, tracer's basics.
"""
