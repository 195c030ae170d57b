/* Pieces every natrace BPF program needs about its target process.
 *
 * Included by each compile unit (alloc.bpf.c, triage.bpf.c): each gets its own copy
 * of the `armed` map and the exec tracepoint. bcc rewrites map calls (armed.lookup)
 * and generates tracepoint argument structs only in the main source, so
 * tracer/probes/bpfprog.py pastes *.bpf.h includes into it before compiling.
 *
 * The traced process is not compiled in: it is in the `target` map, written by
 * tracer/probes/base.py before anything is attached, so one compiled object (cached
 * by tracer/probes/bpfprog.py) serves every process. 0 until then: no process.
 *
 * Compile-time parameter:
 *   WAIT_EXEC    defined when natrace launched the target: record nothing until the
 *                child has exec'd the command
 */
#ifndef NATRACE_TARGET_BPF_H
#define NATRACE_TARGET_BPF_H

/* exec()s of the target since natrace attached (a launched target's first is the
 * gate's): past that, the program is no longer the one natrace was asked to trace. */
#ifdef WAIT_EXEC
#define EXPECTED_EXECS 1
#else
#define EXPECTED_EXECS 0
#endif
BPF_ARRAY(target, u32, 1);   /* the traced process's tgid */
BPF_ARRAY(execs, u64, 1);
/* 1 while recording: set by Python at attach for a running target (tracer/probes/
 * gate.py), by the gate's exec for a launched one; cleared by any later exec, so
 * nothing of the next program mixes into the report of this one. */
BPF_ARRAY(armed, u32, 1);

static __always_inline int is_target(u64 pid_tgid) {
    int zero = 0;
    u32 *tgid = target.lookup(&zero);
    return tgid && *tgid && (pid_tgid >> 32) == *tgid;
}

#if defined(WAIT_EXEC) && defined(UNWIND_CFI)
/* A launched target stops each time it maps code (and at its exec) until natrace has
 * put that code's unwind rows in the table (tracer/probes/unwinding.py): its first
 * allocations are unwound as truly as the later ones. 1 while such a stop is pending;
 * 2 once natrace is detaching (programs can outlive it for a moment: no more stops). */
BPF_ARRAY(code_stops, u32, 1);
static __always_inline void stop_for_unwind_rows(void) {
    int zero = 0;
    u32 *state = code_stops.lookup(&zero);
    if (!state || *state == 2)
        return;
    *state = 1;
    bpf_send_signal(19 /* SIGSTOP */);
}
#else
static __always_inline void stop_for_unwind_rows(void) {}
#endif

TRACEPOINT_PROBE(sched, sched_process_exec) {
    if (!is_target(bpf_get_current_pid_tgid()))
        return 0;
    int zero = 0;
    u64 *n = execs.lookup(&zero);
    if (!n)
        return 0;
    u64 seen = *n + 1;   /* one thread execs at a time: no atomic needed */
    *n = seen;
    u32 on = seen == EXPECTED_EXECS;
    armed.update(&zero, &on);
    if (on)
        stop_for_unwind_rows();
#ifdef WAIT_EXEC
    else if (seen > EXPECTED_EXECS)
        bpf_send_signal(19 /* SIGSTOP */);   /* natrace follows the launched command
                                                through this exec, then re-arms */
#endif
    return 0;
}

static __always_inline int is_armed(void) {
    int zero = 0;
    u32 *a = armed.lookup(&zero);
    return a && *a;
}

#ifdef WAIT_EXEC
/* A launched target calling _Exit (its last call: atexit handlers and destructors have
 * run) stops itself, so natrace can read its maps and final counters before the address
 * space is gone; natrace then resumes it. */
int exit_enter(struct pt_regs *ctx) {
    if (is_armed())
        bpf_send_signal(19 /* SIGSTOP */);
    return 0;
}
#endif

/* The user stack pointer at the syscall or fault being traced. libc's syscall
 * wrappers push nothing, so *sp is the return address into the function that called
 * them, which a frame-pointer walk would skip. */
static __always_inline u64 user_sp(void) {
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
    u64 sp = 0;
    bpf_probe_read_kernel(&sp, sizeof(sp), &regs->sp);
    return sp;
}

#endif
