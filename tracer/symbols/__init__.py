"""Stage 2, symbols: raw addresses to named frames charged to a module.

Owns the target's memory map history (procmaps), ELF symbol tables and their cache
(elfsyms), JIT perf maps, demangling, the memoized symbolizer, callee naming, unwinding
helpers and module attribution. Pure user-space reading of files and /proc: no bcc.
May import: tracer's basics only.
"""
