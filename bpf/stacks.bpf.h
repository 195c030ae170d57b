/* Collision-free user stack ids.
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
 * Compile-time parameters: MAX_STACKS; NCPUS (possible CPUs, set by tracer/probes/bpfprog.py);
 * UNWIND_CFI (tracer/probes/unwinding.py fills its table), UNWIND_DEPTH (frames it takes,
 * at most NATRACE_STACK_DEPTH).
 */
#ifndef NATRACE_STACKS_BPF_H
#define NATRACE_STACKS_BPF_H

BPF_HASH(stack_ids, u64, s32, MAX_STACKS);
BPF_F_TABLE("hash", s32, struct natrace_stack, stack_traces, MAX_STACKS, BPF_F_NO_PREALLOC);
BPF_PERCPU_ARRAY(stack_next, u32, 1);   /* ids handed out by this CPU */
BPF_PERCPU_ARRAY(stack_scratch, struct natrace_stack, 1);

#ifdef UNWIND_CFI
BPF_ARRAY(unwind_conf, struct unwind_conf, 1);
BPF_ARRAY(unwind_rows, struct unwind_row, 2 * NATRACE_UNWIND_ROWS);
BPF_PERCPU_ARRAY(unwind_ends, u64, NATRACE_END_COUNT);

#ifndef UNWIND_DEPTH
#define UNWIND_DEPTH NATRACE_STACK_DEPTH
#endif

/* The row in force at `pc`, copied out. The search runs all its steps (the last ones
 * re-read one row): one fixed path per frame is what keeps the verifier's work small
 * enough for NATRACE_STACK_DEPTH frames. */
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
#define UNWIND_RETURNS 8

struct unwind_returns {
    u64 slot[UNWIND_RETURNS];
    u64 ret[UNWIND_RETURNS];
};

static __always_inline void unwind_read_returns(struct unwind_returns *r) {
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

/* Walk the user stack from the registers the thread entered the kernel with (a
 * uprobe's trap, a syscall, a fault). Returns the frames taken; st->end says why the
 * walk stopped. */
static __always_inline u32 unwind_user_stack(struct natrace_stack *st) {
    int zero = 0;
    struct unwind_conf *confp = unwind_conf.lookup(&zero);
    if (!confp)
        return 0;
    struct unwind_conf conf = *confp;
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
    u64 pc = 0, sp = 0, bp = 0;
    bpf_probe_read_kernel(&pc, sizeof(pc), &regs->ip);
    bpf_probe_read_kernel(&sp, sizeof(sp), &regs->sp);
    bpf_probe_read_kernel(&bp, sizeof(bp), &regs->bp);
    struct unwind_returns returns = {};
    unwind_read_returns(&returns);
    u32 end = NATRACE_END_DEPTH, n = 0;
#pragma clang loop unroll(disable)
    for (u32 i = 0; i < UNWIND_DEPTH; i++) {
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
        st->ips[i] = pc;
        n = i + 1;
        struct unwind_row row = {};
        int known = unwind_find_row(&conf, pc - 1, &row) && row.cfa != NATRACE_CFA_NO_MAPPING;
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
        for (int k = 0; k < UNWIND_RETURNS; k++) {
            if (returns.slot[k] == cfa - 8)
                ra = returns.ret[k];   /* the trampoline stood there */
        }
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
    st->end = end;
    u32 e = end;
    u64 *c = unwind_ends.lookup(&e);
    if (c)
        *c += 1;   /* per-CPU slot */
    return n;
}
#endif

/* `caller`, when not 0, is the return address into the caller of a wrapper (operator
 * new, strdup) around the allocator call the stack is taken at: a frame-pointer walk
 * from inside the allocator skips it (wrappers keep no frame pointer), so it replaces
 * frame 0 (inside the wrapper) unless the walk found it. */
static __always_inline s32 user_stack_id(void *ctx, u64 caller) {
    int zero = 0;
    struct natrace_stack *st = stack_scratch.lookup(&zero);
    if (!st)
        return -ENOMEM;
#ifdef UNWIND_CFI
    /* zero-filled like bpf_get_stack's; the hash loop stops at the first zero, so the
     * verifier need not follow it once per possible depth */
    __builtin_memset(st->ips, 0, sizeof(st->ips));
    if (unwind_user_stack(st) == 0)
        return -EFAULT;
    u32 frames = NATRACE_STACK_DEPTH;
#else
    /* bpf_get_stack zero-fills what it doesn't write */
    long len = bpf_get_stack(ctx, st->ips, sizeof(st->ips), BPF_F_USER_STACK);
    if (len <= 0)
        return len < 0 ? (s32)len : -EFAULT;
    u32 frames = len / 8;
    st->end = 0;
#endif
    if (caller && st->ips[1] != caller && st->ips[2] != caller)
        st->ips[0] = caller;
    u64 hash = 14695981039346656037ULL ^ st->end;
#pragma clang loop unroll(disable)
    for (u32 i = 0; i < NATRACE_STACK_DEPTH; i++) {
        if (i >= frames || st->ips[i] == 0)
            break;
        hash = (hash ^ st->ips[i]) * 1099511628211ULL;
    }
    s32 *known = stack_ids.lookup(&hash);
    if (known)
        return *known;
    /* Per-CPU counters interleave: no atomic fetch-add, which older LLVM BPF
     * targets can't emit. */
    u32 *next = stack_next.lookup(&zero);
    if (!next)
        return -ENOMEM;
    s64 id64 = (s64)*next * NCPUS + bpf_get_smp_processor_id();
    if (id64 >= MAX_STACKS)
        return -ENOSPC;
    *next += 1;
    s32 id = (s32)id64;
    if (stack_traces.update(&id, st) != 0)
        return -ENOMEM;
    if (stack_ids.insert(&hash, &id) != 0) {
        /* another CPU stored the same stack first: use its id (ours stays unused) */
        known = stack_ids.lookup(&hash);
        return known ? *known : -ENOMEM;
    }
    return id;
}

#endif
