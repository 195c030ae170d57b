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

#include "bcc.h"

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
/* A process just stopped itself for natrace: a unit that can wake natrace's poll does
 * (alloc.bpf.c); the others leave it to the poll. */
#ifndef STOPPED_FOR_NATRACE
#define STOPPED_FOR_NATRACE()
#endif

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

/* The current process's unwind slot (natrace_proc.unwind: its table in stacks.bpf.h's
 * unwind_conf), for a capture site that has not looked its process up. */
static __always_inline u32 unwind_slot(void) {
#ifdef UNWIND_CFI
    struct natrace_proc *p = target_proc(bpf_get_current_pid_tgid());
    return p ? p->unwind : 0;
#else
    return 0;   /* the kernel's frame-pointer walk: no table */
#endif
}

/* The targets' generation: it moves whenever any traced process's `armed` changes, so
 * a thread can keep "my process was armed at generation G" and skip the `targets`
 * lookup while G holds (alloc.bpf.c's allocator entries). Two counters, each written
 * by one side only, so neither's increment is lost: [0] by Python (tracer/probes/base.py,
 * at every change of `armed` and when the targets are cleared), [1] by BPF (an exec,
 * atomically). Both only grow, so a generation never comes back. */
BPF_ARRAY(targets_gen, u64, 2);
#define TARGETS_GEN_PY 0
#define TARGETS_GEN_BPF 1

static __always_inline u64 targets_generation(void) {
    int py = TARGETS_GEN_PY, bpf = TARGETS_GEN_BPF;
    u64 *a = targets_gen.lookup(&py), *b = targets_gen.lookup(&bpf);
    if (!a || !b)
        return 0;
    /* 1 << 63 marks a generation seen (a zeroed thread state has none) */
    return (1ULL << 63) | ((*(volatile u64 *)a & 0x7fffffff) << 32) |
           (*(volatile u64 *)b & 0xffffffff);
}

static __always_inline void targets_changed(void) {
    int bpf = TARGETS_GEN_BPF;
    u64 *g = targets_gen.lookup(&bpf);
    if (g)
        __sync_fetch_and_add(g, 1);
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

/* Kernel events come through raw tracepoints (bpf_raw_tracepoint_open), never perf
 * events: opening and closing a perf-event tracepoint takes the kernel's event_mutex,
 * which every other tracer's teardown holds across an RCU grace period per probe
 * (seconds on a shared machine). The syscall events are raw_syscalls' sys_enter and
 * sys_exit, dispatched here by syscall number; x86-64's numbers and argument
 * registers. */
#define NR_MMAP 9
#define NR_MPROTECT 10
#define NR_MUNMAP 11
#define NR_BRK 12
#define NR_MREMAP 25
#define NR_MADVISE 28
#define NR_CLONE 56
#define NR_FORK 57
#define NR_VFORK 58
#define NR_FUTEX 202
#define NR_CLONE3 435
#define NR_FUTEX_WAITV 449
#define NR_FUTEX_WAKE 454
#define NR_FUTEX_WAIT 455
#define NR_FUTEX_REQUEUE 456

/* The syscalls any natrace unit traces: on every other syscall of the machine the one
 * program natrace has per direction returns at once (alloc.bpf.c's, which tail-calls
 * triage.bpf.c's when both trace; see sys_next there). */
static __always_inline int natrace_syscall(long nr) {
    switch (nr) {
    case NR_MMAP:
    case NR_MPROTECT:
    case NR_MUNMAP:
    case NR_BRK:
    case NR_MREMAP:
    case NR_MADVISE:
    case NR_CLONE:
    case NR_FORK:
    case NR_VFORK:
    case NR_FUTEX:
    case NR_CLONE3:
    case NR_FUTEX_WAITV:
    case NR_FUTEX_WAKE:
    case NR_FUTEX_WAIT:
    case NR_FUTEX_REQUEUE:
        return 1;
    }
    return 0;
}

/* sys_enter's arguments: (struct pt_regs *regs, long nr); sys_exit's: (regs, long ret). */
static __always_inline struct pt_regs *syscall_regs(struct bpf_raw_tracepoint_args *ctx) {
    return (struct pt_regs *)ctx->args[0];
}

/* Argument i (0-4) of the syscall whose registers are `regs`. */
static __always_inline u64 syscall_arg(struct pt_regs *regs, int i) {
    u64 v = 0;
    switch (i) {
    case 0: bpf_probe_read_kernel(&v, sizeof(v), &regs->di); break;
    case 1: bpf_probe_read_kernel(&v, sizeof(v), &regs->si); break;
    case 2: bpf_probe_read_kernel(&v, sizeof(v), &regs->dx); break;
    case 3: bpf_probe_read_kernel(&v, sizeof(v), &regs->r10); break;
    case 4: bpf_probe_read_kernel(&v, sizeof(v), &regs->r8); break;
    }
    return v;
}

/* The registers the task entered the kernel with, as a BTF-typed pointer: its fields
 * are read with a plain load (the verifier checks the field), no helper's copy. The
 * field is reached by offset: bcc would turn `regs->field` into a helper's copy. */
#define TASK_REG(field) (*(volatile u64 *)((char *)bpf_task_pt_regs(bpf_get_current_task_btf()) \
                                           + offsetof(struct pt_regs, field)))

/* The number of the syscall returning (sys_exit has no nr argument). Every syscall's
 * exit on the machine asks, a uretprobe's return (a syscall since Linux 6.11) among
 * them: one load. */
static __always_inline long syscall_exit_nr(void) {
    return (long)TASK_REG(orig_ax);
}

RAW_TRACEPOINT_PROBE(sched_process_exec) {
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
        STOPPED_FOR_NATRACE();
    } else {
        p->armed = 0;   /* not followed: nothing of the next program is recorded */
    }
    targets_changed();   /* after `armed` is written: a thread that sees the new
                            generation reads the new flag */
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
        STOPPED_FOR_NATRACE();
    }
    return 0;
}

/* The user stack pointer at the syscall or fault being traced. libc's syscall
 * wrappers push nothing, so *sp is the return address into the function that called
 * them, which a frame-pointer walk would skip. */
static __always_inline u64 user_sp(void) {
    return TASK_REG(sp);
}

#endif
