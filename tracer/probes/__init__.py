"""Stage 1, probes: the only code that talks to bcc and the kernel's tracing interfaces.

Owns the BPF programs' loading (bpfprog), where probes go (allocators, placement), the
launch gate (target), and the checks that say whether tracing can work here (privileges,
doctor). Each probe set turns kernel maps and events into raw figures.
May import: tracer.symbols (to place probes and read stacks), tracer's basics.
"""
