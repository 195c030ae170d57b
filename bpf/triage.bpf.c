/* Triage: futex waits per lock word and call site, memory syscalls, page faults.
 *
 * Raw tracepoints only (no uprobes; see target.bpf.h), aggregated here in the kernel, so the traced
 * program pays a tracepoint hit and a stack walk per event and Python reads a few
 * maps at snapshot time: cheap enough for hours on a production process.
 *
 * Compile-time parameters (set by tracer/probes/triage.py):
 *   WAIT_EXEC                see target.bpf.h
 *   MAX_KEYS, MAX_STACKS     aggregation and stack map sizes
 *   HAVE_FUTEX_WAIT, HAVE_FUTEX_WAKE, HAVE_FUTEX_WAITV, HAVE_FUTEX_REQUEUE,
 *   HAVE_PAGE_FAULT_USER     defined for the tracepoints this kernel has
 */
#include <uapi/linux/ptrace.h>
#include "natrace.h"
#include "target.bpf.h"

/* What the continuations of a stack capture (stacks.bpf.h) need of their event. */
struct capture_event {
    u64 a0;         /* futex: lock word */
    u64 ns;         /* time in the call */
    u64 bytes;      /* memory syscalls */
    s64 ret;        /* futex: the call's return */
    u32 sub;        /* futex: command | NATRACE_FUTEX_PRIVATE_FLAG; memory: NATRACE_MS_* */
    u32 failed;     /* memory syscalls */
};
#define STACKS_TP 1       /* every event comes from a tracepoint: tail_tp */
#define CONT_FUTEX 1      /* tail_tp__1__futex */
#define CONT_MEMSYS 2     /* tail_tp__2__memsys */
#define CONT_FAULT 3      /* tail_tp__3__fault */
#include "stacks.bpf.h"

#define CALL_FUTEX 1
#define CALL_MEM 2

/* A thread inside a traced syscall. */
struct pending_call {
    u64 ts_ns;
    u64 a0;         /* futex: lock word; memory syscalls: address */
    u64 a1;         /* memory syscalls: length (mremap: new length) */
    u32 what;       /* CALL_FUTEX or CALL_MEM */
    u32 sub;        /* futex command (| NATRACE_FUTEX_PRIVATE_FLAG) or NATRACE_MS_* */
};

BPF_HASH(pending, u32, struct pending_call, 16384);
BPF_HASH(futexes, struct futex_key, struct futex_stats, MAX_KEYS);
BPF_HASH(memsys, struct memsys_key, struct memsys_stats, MAX_KEYS);
BPF_HASH(memsys_errors, struct memsys_err_key, u64, 1024);
BPF_HASH(faults, s32, u64, MAX_KEYS);
BPF_PERCPU_ARRAY(counters, u64, NATRACE_TC_COUNT);
BPF_ARRAY(zero_futex, struct futex_stats, 1);   /* never written: a zero value to insert */
BPF_ARRAY(brk_now, u64, 1);                      /* the break after the last brk call */

static __always_inline int ours(void) {
    return is_armed();
}

static __always_inline void count(u32 which, u64 n) {
    u64 *c = counters.lookup(&which);
    if (c)
        *c += n;   /* per-CPU slot: no atomic needed */
}

/* The capture slot for an event whose stack is to be taken (stacks.bpf.h: CFI-unwound
 * through libc unless --unwind fp); NULL, counted, if there is none. */
static __always_inline struct stack_capture *capture(u32 cont) {
    struct stack_capture *cap = capture_begin(cont, 0, unwind_slot());
    if (!cap)
        count(NATRACE_TC_STACK_LOST, 1);
    return cap;
}

/* The taken stack's id, for a continuation; a failed capture's -errno is counted. */
static __always_inline s32 stack_of(struct stack_capture *cap) {
    s32 id = cap->stack_id;
    if (id < 0)
        count(NATRACE_TC_STACK_LOST, 1);
    return id;
}

static __always_inline u32 log2_slot(u64 v) {
    u32 r = 0;
    if (v >> 32) { v >>= 32; r += 32; }
    if (v >> 16) { v >>= 16; r += 16; }
    if (v >> 8) { v >>= 8; r += 8; }
    if (v >> 4) { v >>= 4; r += 4; }
    if (v >> 2) { v >>= 2; r += 2; }
    if (v >> 1) { r += 1; }
    return r < NATRACE_HIST_SLOTS ? r : NATRACE_HIST_SLOTS - 1;
}

static __always_inline void begin(u32 what, u32 sub, u64 a0, u64 a1) {
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct pending_call call = {.ts_ns = bpf_ktime_get_ns(), .a0 = a0, .a1 = a1,
                                .what = what, .sub = sub};
    pending.update(&tid, &call);
}

/* The call this thread began, removed from `pending`; 0 if none of `what`. */
static __always_inline int finish(u32 what, struct pending_call *out) {
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct pending_call *p = pending.lookup(&tid);
    if (!p || p->what != what)
        return 0;
    *out = *p;
    pending.delete(&tid);
    return 1;
}

/* ---- futex --------------------------------------------------------------- */

#define FUTEX_CMD_MASK 127
#define EAGAIN_ 11
#define EINTR_ 4
#define ETIMEDOUT_ 110

static __always_inline int wakes_threads(u32 cmd) {
    switch (cmd) {
    case 1:  /* WAKE */
    case 3:  /* REQUEUE */
    case 4:  /* CMP_REQUEUE */
    case 5:  /* WAKE_OP */
    case 10: /* WAKE_BITSET */
    case 12: /* CMP_REQUEUE_PI */
    case NATRACE_FUTEX2_WAKE:
    case NATRACE_FUTEX2_REQUEUE:
        return 1;
    }
    return 0;
}

static __always_inline int futex_enter(u64 uaddr, u32 cmd) {
    begin(CALL_FUTEX, cmd, uaddr, 0);
    return 0;
}

static __always_inline int futex_exit(void *ctx, long ret) {
    struct pending_call call;
    if (!finish(CALL_FUTEX, &call))
        return 0;
    struct stack_capture *cap = capture(CONT_FUTEX);
    if (!cap)
        return 0;
    cap->ev.a0 = call.a0;
    cap->ev.ns = bpf_ktime_get_ns() - call.ts_ns;
    cap->ev.ret = ret;
    cap->ev.sub = call.sub;
    tail_tp.call(ctx, STACK_WALK);
    stack_drop();
    return 0;
}

/* A futex call once its stack is taken. */
int tail_tp__1__futex(void *ctx) {
    struct stack_capture *cap = capture_resume();
    if (!cap)
        return 0;
    u64 ns = cap->ev.ns;
    long ret = cap->ev.ret;
    u32 sub = cap->ev.sub;
    u32 cmd = sub & ~(u32)NATRACE_FUTEX_PRIVATE_FLAG;
    struct futex_key key = {.uaddr = cap->ev.a0, .stack_id = stack_of(cap), .cmd = cmd};
    struct futex_stats *s = futexes.lookup(&key);
    if (!s) {
        int zero = 0;
        struct futex_stats *z = zero_futex.lookup(&zero);
        if (!z)
            return 0;
        futexes.insert(&key, z);
        s = futexes.lookup(&key);
        if (!s) {
            count(NATRACE_TC_KEYS_FULL, 1);
            return 0;
        }
    }
    __sync_fetch_and_add(&s->calls, 1);
    if (sub & NATRACE_FUTEX_PRIVATE_FLAG)
        __sync_fetch_and_add(&s->private_calls, 1);
    __sync_fetch_and_add(&s->wait_ns, ns);
    if (ns > s->max_ns)
        s->max_ns = ns;   /* racy between threads; a lost update only lowers the max */
    u32 slot = log2_slot(ns);
    __sync_fetch_and_add(&s->hist[slot], 1);
    if (ret == -EAGAIN_)
        __sync_fetch_and_add(&s->err_eagain, 1);
    else if (ret == -ETIMEDOUT_)
        __sync_fetch_and_add(&s->err_etimedout, 1);
    else if (ret == -EINTR_)
        __sync_fetch_and_add(&s->err_eintr, 1);
    else if (ret < 0)
        __sync_fetch_and_add(&s->err_other, 1);
    else if (wakes_threads(cmd))
        __sync_fetch_and_add(&s->woken, (u64)ret);
    return 0;
}

/* futex_waitv and futex_requeue take an array of struct futex_waitv
 * {u64 val; u64 uaddr; u32 flags; u32 reserved}: keyed by the first lock word. */
static __always_inline int futex_vector_enter(void *waiters, u32 cmd) {
    u64 uaddr = 0;
    u32 flags = 0;
    bpf_probe_read_user(&uaddr, sizeof(uaddr), waiters + 8);
    bpf_probe_read_user(&flags, sizeof(flags), waiters + 16);
    begin(CALL_FUTEX, cmd | (flags & NATRACE_FUTEX_PRIVATE_FLAG), uaddr, 0);
    return 0;
}

/* ---- memory syscalls ------------------------------------------------------ */

#define PROT_EXEC_FLAG 0x4

static __always_inline void add_memsys(u32 sys, s32 stack_id, u64 ns, int failed, u64 bytes) {
    struct memsys_key key = {.sys = sys, .stack_id = stack_id};
    struct memsys_stats *s = memsys.lookup(&key);
    if (!s) {
        struct memsys_stats zero = {};
        memsys.insert(&key, &zero);
        s = memsys.lookup(&key);
        if (!s) {
            count(NATRACE_TC_KEYS_FULL, 1);
            return;
        }
    }
    __sync_fetch_and_add(&s->calls, 1);
    __sync_fetch_and_add(&s->ns, ns);
    if (failed)
        __sync_fetch_and_add(&s->errors, 1);
    else
        __sync_fetch_and_add(&s->bytes, bytes);
}

static __always_inline int mem_enter(u32 sys, u64 addr, u64 len) {
    begin(CALL_MEM, sys, addr, len);
    return 0;
}

static __always_inline int mem_exit(void *ctx, long ret) {
    struct pending_call call;
    if (!finish(CALL_MEM, &call))
        return 0;
    u64 ns = bpf_ktime_get_ns() - call.ts_ns;
    u32 sys = call.sub;
    u32 err = 0;
    u64 bytes = call.a1;
    if (sys == NATRACE_MS_BRK) {
        /* brk returns the break: the new one, or the old one when it failed */
        int zero = 0;
        u64 *now = brk_now.lookup(&zero);
        if (call.a0 && (u64)ret != call.a0)
            err = 12;   /* ENOMEM */
        bytes = 0;
        if (now) {
            u64 before = *now;
            if (before)
                bytes = (u64)ret > before ? (u64)ret - before : before - (u64)ret;
            *now = (u64)ret;
        }
    } else if (ret < 0 && ret > -4096) {
        err = (u32)-ret;
    }
    add_memsys(sys, NATRACE_NO_STACK, ns, err != 0, bytes);
    if (err) {
        struct memsys_err_key ek = {.sys = sys, .err = err};
        u64 one = 1;
        u64 *n = memsys_errors.lookup(&ek);
        if (n)
            __sync_fetch_and_add(n, 1);
        else if (memsys_errors.insert(&ek, &one) != 0 && (n = memsys_errors.lookup(&ek)))
            __sync_fetch_and_add(n, 1);   /* another thread inserted it first */
    }
    if (sys == NATRACE_MS_MMAP || sys == NATRACE_MS_MUNMAP || sys == NATRACE_MS_BRK) {
        struct stack_capture *cap = capture(CONT_MEMSYS);
        if (!cap)
            return 0;
        cap->ev.ns = ns;
        cap->ev.bytes = bytes;
        cap->ev.sub = sys;
        cap->ev.failed = err != 0;
        tail_tp.call(ctx, STACK_WALK);
        stack_drop();
    }
    return 0;
}

/* A memory syscall's per-stack figures once its stack is taken. */
int tail_tp__2__memsys(void *ctx) {
    struct stack_capture *cap = capture_resume();
    if (cap)
        add_memsys(cap->ev.sub, stack_of(cap), cap->ev.ns, cap->ev.failed, cap->ev.bytes);
    return 0;
}

/* ---- the syscalls, by number (target.bpf.h) ------------------------------- */

/* 1 for a syscall triage traces: anything else returns at once (a program on
 * raw_syscalls runs for every syscall of every process). */
static __always_inline int traced_syscall(long nr) {
    switch (nr) {
    case NR_FUTEX:
#ifdef HAVE_FUTEX_WAIT
    case NR_FUTEX_WAIT:
#endif
#ifdef HAVE_FUTEX_WAKE
    case NR_FUTEX_WAKE:
#endif
#ifdef HAVE_FUTEX_WAITV
    case NR_FUTEX_WAITV:
#endif
#ifdef HAVE_FUTEX_REQUEUE
    case NR_FUTEX_REQUEUE:
#endif
    case NR_MMAP:
    case NR_MUNMAP:
    case NR_MREMAP:
    case NR_MPROTECT:
    case NR_MADVISE:
    case NR_BRK:
        return 1;
    }
    return 0;
}

RAW_TRACEPOINT_PROBE(sys_enter) {
    long nr = ctx->args[1];
    if (!traced_syscall(nr) || !ours())
        return 0;
    struct pt_regs *regs = syscall_regs(ctx);
    u32 op;
    switch (nr) {
    case NR_FUTEX:
        op = (u32)syscall_arg(regs, 1);
        return futex_enter(syscall_arg(regs, 0),
                           (op & FUTEX_CMD_MASK) | (op & NATRACE_FUTEX_PRIVATE_FLAG));
    case NR_FUTEX_WAIT:   /* (uaddr, val, mask, flags, timeout, clockid) */
        return futex_enter(syscall_arg(regs, 0), NATRACE_FUTEX2_WAIT |
                           (syscall_arg(regs, 3) & NATRACE_FUTEX_PRIVATE_FLAG));
    case NR_FUTEX_WAKE:   /* (uaddr, mask, nr, flags) */
        return futex_enter(syscall_arg(regs, 0), NATRACE_FUTEX2_WAKE |
                           (syscall_arg(regs, 3) & NATRACE_FUTEX_PRIVATE_FLAG));
    case NR_FUTEX_WAITV:
        return futex_vector_enter((void *)syscall_arg(regs, 0), NATRACE_FUTEX2_WAITV);
    case NR_FUTEX_REQUEUE:
        return futex_vector_enter((void *)syscall_arg(regs, 0), NATRACE_FUTEX2_REQUEUE);
    case NR_MMAP:
        if (syscall_arg(regs, 2) & PROT_EXEC_FLAG)
            count(NATRACE_TC_EXEC_MMAPS, 1);
        return mem_enter(NATRACE_MS_MMAP, syscall_arg(regs, 0), syscall_arg(regs, 1));
    case NR_MUNMAP:
        return mem_enter(NATRACE_MS_MUNMAP, syscall_arg(regs, 0), syscall_arg(regs, 1));
    case NR_MREMAP:       /* (addr, old_len, new_len, flags, new_addr) */
        return mem_enter(NATRACE_MS_MREMAP, syscall_arg(regs, 0), syscall_arg(regs, 2));
    case NR_MPROTECT:
        return mem_enter(NATRACE_MS_MPROTECT, syscall_arg(regs, 0), syscall_arg(regs, 1));
    case NR_MADVISE:
        return mem_enter(NATRACE_MS_MADVISE, syscall_arg(regs, 0), syscall_arg(regs, 1));
    case NR_BRK:
        return mem_enter(NATRACE_MS_BRK, syscall_arg(regs, 0), 0);
    }
    return 0;
}

RAW_TRACEPOINT_PROBE(sys_exit) {
    long nr = syscall_exit_nr();
    if (!traced_syscall(nr) || !ours())
        return 0;
    long ret = (long)ctx->args[1];
    switch (nr) {
    case NR_FUTEX:
    case NR_FUTEX_WAIT:
    case NR_FUTEX_WAKE:
    case NR_FUTEX_WAITV:
    case NR_FUTEX_REQUEUE:
        return futex_exit(ctx, ret);
    }
    return mem_exit(ctx, ret);
}

/* ---- page faults ------------------------------------------------------------ */

#ifdef HAVE_PAGE_FAULT_USER
RAW_TRACEPOINT_PROBE(page_fault_user) {
    if (!ours())
        return 0;
    count(NATRACE_TC_FAULTS, 1);
    struct stack_capture *cap = capture(CONT_FAULT);
    if (cap) {
        cap->flags |= CAPTURE_PC_EXACT;   /* the faulting instruction */
        tail_tp.call(ctx, STACK_WALK);
        stack_drop();
    }
    return 0;
}

/* A page fault once its stack is taken. */
int tail_tp__3__fault(void *ctx) {
    struct stack_capture *cap = capture_resume();
    if (!cap)
        return 0;
    s32 id = stack_of(cap);
    u64 one = 1;
    u64 *n = faults.lookup(&id);
    if (n)
        __sync_fetch_and_add(n, 1);
    else if (faults.insert(&id, &one) != 0) {
        n = faults.lookup(&id);
        if (n)
            __sync_fetch_and_add(n, 1);
        else
            count(NATRACE_TC_KEYS_FULL, 1);
    }
    return 0;
}
#endif
