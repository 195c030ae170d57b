/* Pieces every natrace BPF program needs about its target process.
 *
 * Included by each compile unit (alloc.bpf.c, triage.bpf.c, handles.bpf.c): each gets
 * its own copy of the `targets` map and the exec tracepoint. bcc rewrites map calls
 * (targets.lookup) and generates tracepoint argument structs only in the main source,
 * so tracer/probes/bpfprog.py pastes *.bpf.h includes into it before compiling.
 *
 * The traced processes are not compiled in: they are in the `targets` map, so one
 * compiled object (cached by tracer/probes/bpfprog.py) serves every process.
 *
 * Compile-time parameter:
 *   WAIT_EXEC    defined when natrace launched the target: record nothing until the
 *                child has exec'd the command
 */
#ifndef NATRACE_TARGET_BPF_H
#define NATRACE_TARGET_BPF_H

/* exec()s of the process natrace was given since it attached (a launched target's first
 * is the gate's): past that, the process runs another program, which natrace follows. */
#ifdef WAIT_EXEC
#define EXPECTED_EXECS 1
#else
#define EXPECTED_EXECS 0
#endif
/* The traced processes by tgid (struct natrace_proc): the one natrace was given, written
 * by tracer/probes/base.py before anything is attached (empty until then: no process),
 * and the processes it forks when natrace follows children (alloc.bpf.c). Its `armed`
 * is 1 while recording: set by Python at attach for a running target, by the gate's
 * exec for a launched one; cleared by any later exec until natrace has followed it, so
 * nothing of the next program mixes into the old one's figures. */
BPF_HASH(targets, u32, struct natrace_proc, NATRACE_MAX_PROCS);

/* The traced process the current task belongs to, or NULL: the one map lookup a probe
 * pays to know whether it is natrace's. */
static __always_inline struct natrace_proc *target_proc(u64 pid_tgid) {
    u32 tgid = pid_tgid >> 32;
    return targets.lookup(&tgid);
}

static __always_inline int is_target(u64 pid_tgid) {
    return target_proc(pid_tgid) != NULL;
}

static __always_inline struct natrace_proc *armed_proc(void) {
    struct natrace_proc *p = target_proc(bpf_get_current_pid_tgid());
    return p && p->armed ? p : NULL;
}

static __always_inline int is_armed(void) {
    return armed_proc() != NULL;
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
    struct natrace_proc *p = target_proc(bpf_get_current_pid_tgid());
    if (!p)
        return 0;
    u32 seen = p->execs + 1;   /* one thread execs at a time: no atomic needed */
    p->execs = seen;
    if (!p->parent && seen == EXPECTED_EXECS) {   /* the launch gate's exec */
        p->armed = 1;
        stop_for_unwind_rows();
    } else if (p->follow) {
        /* another program: natrace follows it (its files probed, the old address
         * space's figures set aside), then re-arms and resumes it */
        p->armed = 0;
        p->stop = NATRACE_STOP_EXEC;
        bpf_send_signal(19 /* SIGSTOP */);
    } else {
        p->armed = 0;   /* not followed: nothing of the next program is recorded */
    }
    return 0;
}

/* A process natrace stops at _Exit (its last call: atexit handlers and destructors have
 * run) stops itself there, so natrace can read its maps and final counters before the
 * address space is gone; natrace then resumes it. */
int exit_enter(struct pt_regs *ctx) {
    struct natrace_proc *p = armed_proc();
    if (p) {
        p->stop = NATRACE_STOP_EXIT;
        bpf_send_signal(19 /* SIGSTOP */);
    }
    return 0;
}

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
