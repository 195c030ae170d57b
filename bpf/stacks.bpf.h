/* Collision-free user stack ids, taken by one walk program per program type.
 *
 * BPF_STACK_TRACE hashes a stack into one bucket and fails with -EEXIST when the
 * bucket holds another stack: on a busy Node.js process a 32k-entry map lost
 * stacks by the thousand. Here a stack is hashed (FNV-1a over its frames) into a
 * u64 that maps to a small sequential id; the frames are stored once under that
 * id in a map that allocates on insert, so a big limit costs nothing until used.
 * Ids stay s32 and negative values stay -errno, like bpf_get_stackid's.
 *
 * Frames come from the kernel's frame-pointer walk (bpf_get_stack), or, with
 * UNWIND_CFI defined, from natrace's own walk: CFI rows (tracer/symbols/cfi.py) for
 * objects whose code keeps no frame pointers, rbp for the others and for JIT code,
 * each frame's object found in the target's executable mappings. Whatever the walk
 * cannot follow ends the stack, the reason kept in the stack and counted: nothing
 * is guessed.
 *
 * The walk is verified once, not in every program that needs a stack: ~2k verifier
 * instructions per frame, inlined into a dozen programs, made attaching take seconds.
 * A program that needs a stack (a capture site) puts what it will need afterwards in
 * this CPU's `stack_capture` and tail-calls the walk program of its program type
 * (slot STACK_WALK of tail_kp for uprobes, tail_tp for tracepoints), which walks
 * STACK_CHUNK frames per run (tail-calling itself for the next ones), stores the stack
 * and tail-calls the capture's continuation (slot `cont`) with the id in the capture.
 * Walk and continuations are functions named tail_kp__N__what / tail_tp__N__what,
 * put in slot N of their array by tracer/probes/bpfimage.py. Each unit defines
 * `struct capture_event` (what its continuations read) and STACKS_KP and/or STACKS_TP
 * (the program types it captures from: only those get a walk program) before
 * including this file.
 *
 * Compile-time parameters: MAX_STACKS; NCPUS (possible CPUs, set by tracer/probes/bpfprog.py);
 * UNWIND_CFI (tracer/probes/unwinding.py fills its table), UNWIND_DEPTH (frames it takes,
 * at most NATRACE_STACK_DEPTH).
 */
#ifndef NATRACE_STACKS_BPF_H
#define NATRACE_STACKS_BPF_H

BPF_HASH(stack_ids, u64, s32, MAX_STACKS);
BPF_F_TABLE("hash", s32, struct natrace_stack, stack_traces, MAX_STACKS, BPF_F_NO_PREALLOC);
BPF_PERCPU_ARRAY(stack_next, u32, 1);   /* ids handed out by this CPU */

#define STACK_WALK 0        /* the walk program's slot in tail_kp and tail_tp */
#define STACK_SLOTS 8
#ifdef STACKS_KP
BPF_PROG_ARRAY(tail_kp, STACK_SLOTS);   /* uprobe (kprobe-type) programs */
#endif
#ifdef STACKS_TP
BPF_PROG_ARRAY(tail_tp, STACK_SLOTS);   /* tracepoint programs */
#endif
/* Captures by why their walk ended (NATRACE_END_*); in unwind_ends' NATRACE_END_DROPPED,
 * those whose event was lost: a tail call failed (natrace is detaching: the kernel
 * empties a program array when its last user fd closes) or another task's capture took
 * this CPU's slot while this one was preempted. */
BPF_PERCPU_ARRAY(unwind_ends, u64, NATRACE_END_COUNT);

#define UNWIND_RETURNS 8
struct unwind_returns {
    u64 slot[UNWIND_RETURNS];
    u64 ret[UNWIND_RETURNS];
};

/* One capture in progress on this CPU: the stack being walked, where the walk is, and
 * the event it belongs to. */
struct stack_capture {
    struct natrace_stack st;
    u64 pid_tgid;       /* whose capture this is */
    u64 caller;         /* see capture_stack() */
    u64 pc, sp, bp;     /* the walk's next frame */
    struct unwind_returns returns;
    struct unwind_conf conf;
    u32 n;              /* frames taken */
    u32 cont;           /* the continuation's slot */
    s32 stack_id;       /* the result, for the continuation */
    u32 pad;
    struct capture_event ev;
};
BPF_PERCPU_ARRAY(stack_capture, struct stack_capture, 1);

static __always_inline void stack_drop(void) {
    u32 dropped = NATRACE_END_DROPPED;
    u64 *c = unwind_ends.lookup(&dropped);
    if (c)
        *c += 1;   /* per-CPU slot */
}

/* This CPU's capture slot, for a capture site to fill; NULL if there is none. The
 * site then calls tail_kp/tail_tp.call(ctx, STACK_WALK) and, if that returns (no walk
 * program: natrace is detaching), stack_drop(). */
static __always_inline struct stack_capture *capture_begin(u32 cont, u64 caller) {
    int zero = 0;
    struct stack_capture *cap = stack_capture.lookup(&zero);
    if (!cap)
        return NULL;
    cap->pid_tgid = bpf_get_current_pid_tgid();
    cap->caller = caller;
    cap->cont = cont;
    cap->n = 0;
    cap->stack_id = -EFAULT;
    /* zero-padded, as stored and as bpf_get_stack leaves it */
    __builtin_memset(cap->st.ips, 0, sizeof(cap->st.ips));
    return cap;
}

/* The capture this task began on this CPU, for the walk and the continuation; NULL
 * (counted) if another task's capture has taken the slot since. */
static __always_inline struct stack_capture *capture_resume(void) {
    int zero = 0;
    struct stack_capture *cap = stack_capture.lookup(&zero);
    if (!cap)
        return NULL;
    if (cap->pid_tgid != bpf_get_current_pid_tgid()) {
        stack_drop();
        return NULL;
    }
    return cap;
}

#ifdef UNWIND_CFI
BPF_ARRAY(unwind_conf, struct unwind_conf, 1);
BPF_ARRAY(unwind_rows, struct unwind_row, 2 * NATRACE_UNWIND_ROWS);

#ifndef UNWIND_DEPTH
#define UNWIND_DEPTH NATRACE_STACK_DEPTH
#endif
/* Frames per run of the walk program: what the verifier follows once per program type. */
#ifndef STACK_CHUNK
#define STACK_CHUNK 16
#endif

/* The row in force at `pc`, copied out. The search runs all its steps (the last ones
 * re-read one row): one fixed path per frame is what keeps the verifier's work small. */
static __always_inline int unwind_find_row(const struct unwind_conf *conf, u64 pc,
                                           struct unwind_row *out) {
    u32 base = conf->base, n = conf->count;
    if (n == 0 || n > NATRACE_UNWIND_ROWS)
        return 0;
#pragma clang loop unroll(disable)
    for (int k = 0; k < NATRACE_UNWIND_STEPS; k++) {
        u32 half = n / 2;
        u32 idx = base + half;
        struct unwind_row *r = unwind_rows.lookup(&idx);
        if (!r)
            return 0;
        if (r->pc <= pc)
            base = idx;
        n -= half;
    }
    struct unwind_row *r = unwind_rows.lookup(&base);
    if (!r || r->pc > pc)
        return 0;
    *out = *r;
    return 1;
}

/* A function with a uretprobe pending (natrace's own: malloc around a brk, PQexec
 * around a malloc) has its return address replaced by the kernel's trampoline; the
 * kernel keeps the original in current->utask->return_instances, innermost first,
 * each with the address of the stack slot it replaced. The walk reads them once and
 * puts the originals back, as the kernel's own stack traces do. The field offsets come
 * from the running kernel's BTF (tracer/probes/kernelbtf.py): KOFF_*. */
static __always_inline void unwind_read_returns(struct unwind_returns *r) {
    __builtin_memset(r, 0, sizeof(*r));
#ifdef KOFF_TASK_UTASK
    u64 task = bpf_get_current_task();
    u64 utask = 0, ri = 0;
    bpf_probe_read_kernel(&utask, sizeof(utask), (void *)(task + KOFF_TASK_UTASK));
    if (utask)
        bpf_probe_read_kernel(&ri, sizeof(ri), (void *)(utask + KOFF_UTASK_RETURN_INSTANCES));
#pragma unroll
    for (int k = 0; k < UNWIND_RETURNS; k++) {
        if (!ri)
            break;
        bpf_probe_read_kernel(&r->slot[k], sizeof(u64), (void *)(ri + KOFF_RI_STACK));
        bpf_probe_read_kernel(&r->ret[k], sizeof(u64), (void *)(ri + KOFF_RI_ORIG_RET_VADDR));
        bpf_probe_read_kernel(&ri, sizeof(ri), (void *)(ri + KOFF_RI_NEXT));
    }
#endif
}

/* The walk's first run: the registers the thread entered the kernel with (a uprobe's
 * trap, a syscall, a fault), the pending uretprobes, the table in force. 0: no table. */
static __always_inline int unwind_start(struct stack_capture *cap) {
    int zero = 0;
    struct unwind_conf *confp = unwind_conf.lookup(&zero);
    if (!confp)
        return 0;
    cap->conf = *confp;
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
    u64 pc = 0, sp = 0, bp = 0;
    bpf_probe_read_kernel(&pc, sizeof(pc), &regs->ip);
    bpf_probe_read_kernel(&sp, sizeof(sp), &regs->sp);
    bpf_probe_read_kernel(&bp, sizeof(bp), &regs->bp);
    cap->pc = pc;
    cap->sp = sp;
    cap->bp = bp;
    unwind_read_returns(&cap->returns);
    return 1;
}

/* Up to STACK_CHUNK more frames. Returns 1 when the walk is over (cap->st.end says
 * why), 0 when it should go on. */
static __always_inline int unwind_chunk(struct stack_capture *cap) {
    u64 pc = cap->pc, sp = cap->sp, bp = cap->bp;
    u32 n = cap->n;
    struct unwind_conf conf = cap->conf;
    struct unwind_returns returns = cap->returns;
    u32 end = NATRACE_END_COUNT;   /* no end: the walk goes on */
#pragma clang loop unroll(disable)
    for (u32 k = 0; k < STACK_CHUNK; k++) {
        u32 i = n;
        if (i >= UNWIND_DEPTH) {
            end = NATRACE_END_DEPTH;
            break;
        }
        if (pc == 0) {
            end = NATRACE_END_OUTERMOST;
            break;
        }
        /* Every frame's pc is a return address (frame 0: the uretprobe's, or the
         * instruction after a syscall) and may lie just past a noreturn call: the row
         * of the call instruction itself is the one in force. Code outside the table's
         * mappings (mapped since it was loaded: a dlopen a moment ago) is walked by
         * frame pointers; if that fails, the end is counted as "no mapping", and
         * Python keeps no frame that does not follow a call instruction. */
        /* i < UNWIND_DEPTH <= 127 here, but clang turns the index into a pointer
         * stepped per frame that the verifier cannot bound: hidden from clang, the mask
         * stays and bounds it (slot 127 would still lie inside `cap`). */
        u32 slot = i;
        asm volatile("" : "+r"(slot));
        cap->st.ips[slot & 127] = pc;
        n = i + 1;
        struct unwind_row row = {};
        int known = unwind_find_row(&conf, pc - 1, &row) &&
                    row.cfa != NATRACE_CFA_NO_MAPPING;
        if (!known) {
            row.cfa = NATRACE_CFA_FP;
            row.cfa_off = 0;
        }
        u64 cfa;
        if (row.cfa == NATRACE_CFA_FP) {
            /* [rbp] = the caller's rbp, [rbp+8] = the return address */
            if (bp == 0) {
                end = known ? NATRACE_END_OUTERMOST : NATRACE_END_NO_MAPPING;
                break;
            }
            cfa = bp + 16;
            row.rbp = NATRACE_RBP_SAVED;
            row.rbp_off = -16;
        } else if (row.cfa == NATRACE_CFA_RSP) {
            cfa = sp + row.cfa_off;
        } else if (row.cfa == NATRACE_CFA_RBP) {
            cfa = bp + row.cfa_off;
        } else {
            end = row.cfa == NATRACE_CFA_END ? NATRACE_END_OUTERMOST
                : row.cfa == NATRACE_CFA_NONE ? NATRACE_END_NO_ROW : NATRACE_END_UNSUPPORTED;
            break;
        }
        if (cfa <= sp) {
            end = known ? NATRACE_END_BAD_FRAME : NATRACE_END_NO_MAPPING;
            break;
        }
        u64 ra = 0;
        if (bpf_probe_read_user(&ra, sizeof(ra), (void *)(cfa - 8)) != 0) {
            end = NATRACE_END_READ;
            break;
        }
#pragma unroll
        for (int r = 0; r < UNWIND_RETURNS; r++) {
            if (returns.slot[r] == cfa - 8)
                ra = returns.ret[r];   /* the trampoline stood there */
        }
        /* a new value to the verifier: linked to a `returns` slot, pc would make each
         * frame's states differ from the last one's, and the verifier's work grow with
         * the square of the frames */
        asm volatile("%0 ^= 0" : "+r"(ra));
        if (row.rbp == NATRACE_RBP_SAVED) {
            if (bpf_probe_read_user(&bp, sizeof(bp), (void *)(cfa + row.rbp_off)) != 0) {
                end = NATRACE_END_READ;
                break;
            }
        } else if (row.rbp == NATRACE_RBP_LOST) {
            bp = 0;
        }
        sp = cfa;
        pc = ra;
    }
    cap->pc = pc;
    cap->sp = sp;
    cap->bp = bp;
    cap->n = n;
    int over = end != NATRACE_END_COUNT;
    if (over) {
        cap->st.end = end;
        u32 e = end;
        u64 *c = unwind_ends.lookup(&e);
        if (c)
            *c += 1;   /* per-CPU slot */
    }
    return over;
}
#endif

/* The frames taken into the capture's stack: its id in cap->stack_id. `caller`, when
 * not 0, is the return address into the caller of a wrapper (operator new, strdup)
 * around the allocator call the stack is taken at: a frame-pointer walk from inside
 * the allocator skips it (wrappers keep no frame pointer), so it replaces frame 0
 * (inside the wrapper) unless the walk found it. */
static __always_inline void stack_store(struct stack_capture *cap) {
    struct natrace_stack *st = &cap->st;
    u32 frames = cap->n;
    if (frames == 0) {
        cap->stack_id = -EFAULT;
        return;
    }
    u64 caller = cap->caller;
    if (caller && st->ips[1] != caller && st->ips[2] != caller)
        st->ips[0] = caller;
    u64 hash = 14695981039346656037ULL ^ st->end;
#pragma clang loop unroll(disable)
    for (u32 i = 0; i < NATRACE_STACK_DEPTH; i++) {
        if (i >= frames)
            break;
        hash = (hash ^ st->ips[i]) * 1099511628211ULL;
    }
    s32 *known = stack_ids.lookup(&hash);
    if (known) {
        cap->stack_id = *known;
        return;
    }
    /* Per-CPU counters interleave: no atomic fetch-add, which older LLVM BPF
     * targets can't emit. */
    int zero = 0;
    u32 *next = stack_next.lookup(&zero);
    if (!next) {
        cap->stack_id = -ENOMEM;
        return;
    }
    s64 id64 = (s64)*next * NCPUS + bpf_get_smp_processor_id();
    if (id64 >= MAX_STACKS) {
        cap->stack_id = -ENOSPC;
        return;
    }
    *next += 1;
    s32 id = (s32)id64;
    if (stack_traces.update(&id, st) != 0) {
        cap->stack_id = -ENOMEM;
        return;
    }
    if (stack_ids.insert(&hash, &id) != 0) {
        /* another CPU stored the same stack first: use its id (ours stays unused) */
        known = stack_ids.lookup(&hash);
        cap->stack_id = known ? *known : -ENOMEM;
        return;
    }
    cap->stack_id = id;
}

/* One run of a walk program: the slot to tail-call next, the walk's own while frames
 * remain, else (the stack stored) the continuation's; STACK_SLOTS (none) if the
 * capture is not this task's. */
static __always_inline u32 stack_walk(void *ctx) {
    struct stack_capture *cap = capture_resume();
    if (!cap)
        return STACK_SLOTS;
#ifdef UNWIND_CFI
    if (cap->n == 0 && !unwind_start(cap))
        return cap->cont;   /* no table: stack_id stays -EFAULT */
    if (!unwind_chunk(cap))
        return STACK_WALK;
#else
    /* bpf_get_stack zero-fills what it doesn't write */
    long len = bpf_get_stack(ctx, cap->st.ips, sizeof(cap->st.ips), BPF_F_USER_STACK);
    if (len <= 0) {
        cap->stack_id = len < 0 ? (s32)len : -EFAULT;
        return cap->cont;
    }
    cap->n = len / 8;
    cap->st.end = 0;
#endif
    stack_store(cap);
    return cap->cont;
}

/* The walk programs: bcc rewrites a map's .call() only in code written out, not in a
 * macro, hence one short function per program array. */
#ifdef STACKS_KP
int tail_kp__0__walk(struct pt_regs *ctx) {
    u32 next = stack_walk(ctx);
    if (next < STACK_SLOTS) {
        tail_kp.call(ctx, next);
        stack_drop();
    }
    return 0;
}
#endif

#ifdef STACKS_TP
int tail_tp__0__walk(void *ctx) {
    u32 next = stack_walk(ctx);
    if (next < STACK_SLOTS) {
        tail_tp.call(ctx, next);
        stack_drop();
    }
    return 0;
}
#endif

#endif
