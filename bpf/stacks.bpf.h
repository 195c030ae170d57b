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
 * each frame's object found in its process's executable mappings (each traced process
 * has a table of its own: unwind_conf's slot natrace_proc.unwind). Whatever the walk
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

/* The registers the thread entered the kernel with (a uprobe's trap, a syscall, a
 * fault), when the program's context holds them (a uprobe's: `have`). */
struct unwind_regs {
    u64 pc, sp, bp;
    u32 have;
};

#define UNWIND_RETURNS 8
struct unwind_returns {
    u64 slot[UNWIND_RETURNS];
    u64 ret[UNWIND_RETURNS];
};

/* The stack-id cache (UNWIND_CFI only). The walk is deterministic: given its first
 * registers, the table and the stack words it read, it takes the same frames. So a
 * walk that read few enough words, all near its first sp, is kept in this CPU's cache
 * (direct-mapped by pc, sp and caller): its id, its end, and each word it *used*, by
 * offset from the first sp. A later capture with the same registers re-reads
 * [sp, sp + span) in one read and reuses the id only if every kept word is unchanged:
 * the same walk, the same stack. A word counts as used when the walk's path depends on
 * it: every return address; a saved rbp (or the first rbp) only once a later frame
 * finds its CFA from rbp, so a callee-saved rbp holding a loop variable does not defeat
 * the cache. Never kept: a walk that crossed a uretprobe trampoline (its return address
 * came from the kernel, not the stack) or failed a read. */
#define STACK_CACHE_SETS 64       /* entries per CPU, a power of two */
#define STACK_CACHE_WORDS 32      /* used words a kept walk may have: a power of two */
#define STACK_CACHE_SPAN 2048     /* bytes above the first sp they must lie in: a power of two */
#define STACK_WORDS_NONE STACK_CACHE_WORDS + 1   /* stack_words.n: the walk can't be kept */
struct stack_words {
    u32 n;              /* used words, or STACK_WORDS_NONE */
    u32 span;           /* bytes from the first sp past the last used word */
    u64 val[STACK_CACHE_WORDS];
    u16 off[STACK_CACHE_WORDS];   /* each one's offset from the first sp */
};

/* One capture in progress on this CPU: the stack being walked, where the walk is, and
 * the event it belongs to. */
struct stack_capture {
    struct natrace_stack st;
    u64 pid_tgid;       /* whose capture this is */
    u64 caller;         /* see capture_stack() */
    u64 pc, sp, bp;     /* the walk's next frame */
    u64 pc0, sp0, bp0;  /* its first (the cache's key) */
    struct unwind_returns returns;
    struct unwind_conf conf;
    u32 n;              /* frames taken */
    u32 cont;           /* the continuation's slot */
    s32 stack_id;       /* the result, for the continuation */
    u32 flags;          /* CAPTURE_* */
    u32 slot;           /* the process's unwind_conf slot (natrace_proc.unwind) */
    u32 pad;
    u64 bp_word_at;     /* where the bp in use was read, if CAPTURE_BP_READ */
    struct stack_words words;   /* what the walk used, for the cache */
    u64 scratch[STACK_CACHE_SPAN / 8];   /* the cache's re-read */
    struct capture_event ev;
};
#define CAPTURE_RETURNS 1   /* the pending uretprobes are read into `returns` */
#define CAPTURE_FIXUP 2     /* the next frame's pc is a trampoline's stand-in: replace it */
#define CAPTURE_BP_FIRST 4  /* the bp in use is the first one (a register, in the key) */
#define CAPTURE_BP_READ 8   /* the bp in use was read from the stack, at bp_word_off */
#define CAPTURE_BP_USED 16  /* the first bp was used: the cache compares it */
#define CAPTURE_STARTED 32  /* the walk's start is taken and the cache was tried */
#define CAPTURE_PC_EXACT 64 /* frame 0's pc is the instruction itself (a page fault's), not
                               a return address: its own row is in force, not its
                               predecessor's (an instruction fetch faults at a
                               function's first byte) */
BPF_PERCPU_ARRAY(stack_capture, struct stack_capture, 1);

static __always_inline void stack_drop(void) {
    u32 dropped = NATRACE_END_DROPPED;
    u64 *c = unwind_ends.lookup(&dropped);
    if (c)
        *c += 1;   /* per-CPU slot */
}

/* This CPU's capture slot, for a capture site to fill; NULL if there is none. The
 * site then calls tail_kp/tail_tp.call(ctx, STACK_WALK) and, if that returns (no walk
 * program: natrace is detaching), stack_drop(). `unwind`: the current process's
 * unwind_conf slot (natrace_proc.unwind, which the site has looked up or cached). */
static __always_inline struct stack_capture *capture_begin(u32 cont, u64 caller,
                                                           u32 unwind) {
    int zero = 0;
    struct stack_capture *cap = stack_capture.lookup(&zero);
    if (!cap)
        return NULL;
    cap->pid_tgid = bpf_get_current_pid_tgid();
    cap->caller = caller;
    cap->cont = cont;
    cap->n = 0;
    cap->stack_id = -EFAULT;
    cap->flags = 0;
    cap->slot = unwind;
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

/* Frames per run of the walk program: what the verifier follows once per program type
 * (its work grows with it; a deeper stack tail-calls the walk more). STACK_CHUNK_TP for
 * the tracepoint walk, whose events (mmap, brk, futex) are rarer than a uprobe's. */
#ifndef STACK_CHUNK
#define STACK_CHUNK 16
#endif
#ifndef STACK_CHUNK_TP
#define STACK_CHUNK_TP STACK_CHUNK
#endif

#ifdef UNWIND_CFI
/* Each traced process's table: a segment of unwind_rows, by its slot. */
BPF_ARRAY(unwind_conf, struct unwind_conf, NATRACE_UNWIND_SLOTS);
BPF_ARRAY(unwind_rows, struct unwind_row, NATRACE_UNWIND_TABLE);

#ifndef UNWIND_DEPTH
#define UNWIND_DEPTH NATRACE_STACK_DEPTH
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
 * around a malloc) has its return address replaced by the kernel's trampoline, which
 * starts the process's [uprobes] page; the kernel keeps the original in
 * current->utask->return_instances, innermost first, each with the address of the
 * stack slot it replaced. The walk puts the originals back, as the kernel's own stack
 * traces do, reading them (~5 kernel reads) only once a return address it read is
 * page-aligned, as the trampoline's is. The field offsets come from the running
 * kernel's BTF (tracer/probes/kernelbtf.py): KOFF_*. */
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

static __always_inline void unwind_count_end(u32 end) {
    u64 *c = unwind_ends.lookup(&end);
    if (c)
        *c += 1;   /* per-CPU slot */
}

/* A cached walk (see struct stack_words). Written by the capture that walked it; a
 * task preempted while writing or reading one (BPF programs of uprobes and syscall
 * tracepoints are preemptible) must not see another's half-written entry: a writer
 * holds `writers` up (an atomic add: no fetch needed) and bumps `seq` when done; a
 * reader trusts what it read only if no writer was active and seq did not move; a
 * writer that finds seq moved under it (another wrote in the middle of its write)
 * leaves the entry invalid (gen 0: no table has it). */
struct stack_cache_entry {
    u32 writers;        /* writes in progress */
    u32 seq;            /* writes done */
    u32 gen;            /* unwind_conf.gen of the table walked; 0: invalid */
    u32 bp_used;        /* 1: the walk used the first bp, which is then part of the key */
    u64 pc, sp, bp, caller;
    s32 stack_id;
    u32 end;
    struct stack_words words;
};
BPF_PERCPU_ARRAY(stack_cache, struct stack_cache_entry, STACK_CACHE_SETS);
/* Captures the cache answered (STACK_CACHE_HIT), walks kept in it (STACK_CACHE_KEPT),
 * and captures whose registers matched a kept walk of which a word had changed
 * (STACK_CACHE_STALE: walked afresh). */
#define STACK_CACHE_HIT 0
#define STACK_CACHE_KEPT 1
#define STACK_CACHE_STALE 2
BPF_PERCPU_ARRAY(stack_cache_counts, u64, 3);

static __always_inline struct stack_cache_entry *stack_cache_entry(struct stack_capture *cap) {
    u64 h = (cap->pc0 ^ (cap->sp0 << 20) ^ (cap->sp0 >> 4) ^ cap->caller) * 0x9E3779B97F4A7C15ULL;
    u32 set = (u32)(h >> 40) & (STACK_CACHE_SETS - 1);
    return stack_cache.lookup(&set);
}

static __always_inline void stack_cache_count(u32 which) {
    u64 *c = stack_cache_counts.lookup(&which);
    if (c)
        *c += 1;   /* per-CPU slot */
}

/* The id of the stack this capture's walk would take, from the cache, into
 * cap->stack_id: 1 if it has the walk and every word the walk used is unchanged. */
static __always_inline int stack_cache_hit(struct stack_capture *cap) {
    struct stack_cache_entry *e = stack_cache_entry(cap);
    if (!e)
        return 0;
    u32 seq = *(volatile u32 *)&e->seq;
    if (*(volatile u32 *)&e->writers != 0)
        return 0;
    asm volatile("" ::: "memory");
    if (e->gen != cap->conf.gen || e->pc != cap->pc0 || e->sp != cap->sp0 ||
        e->caller != cap->caller || (e->bp_used && e->bp != cap->bp0))
        return 0;
    u32 n = e->words.n, span = e->words.span;
    if (n > STACK_CACHE_WORDS || span == 0 || span > STACK_CACHE_SPAN)
        return 0;
    if (bpf_probe_read_user(cap->scratch, span, (void *)cap->sp0) != 0)
        return 0;
#pragma clang loop unroll(disable)
    for (u32 i = 0; i < STACK_CACHE_WORDS; i++) {
        if (i >= n)
            break;
        u32 at = e->words.off[i] / 8;
        if (cap->scratch[at & (STACK_CACHE_SPAN / 8 - 1)] != e->words.val[i]) {
            stack_cache_count(STACK_CACHE_STALE);
            return 0;
        }
    }
    s32 id = e->stack_id;
    u32 end = e->end;
    asm volatile("" ::: "memory");
    if (*(volatile u32 *)&e->writers != 0 || *(volatile u32 *)&e->seq != seq)
        return 0;
    cap->stack_id = id;
    unwind_count_end(end);
    stack_cache_count(STACK_CACHE_HIT);
    return 1;
}

/* Keep the walk just taken and stored, if it can be. */
static __always_inline void stack_cache_keep(struct stack_capture *cap) {
    u32 n = cap->words.n;
    if (cap->stack_id < 0 || n == 0 || n > STACK_CACHE_WORDS)
        return;
    struct stack_cache_entry *e = stack_cache_entry(cap);
    if (!e)
        return;
    __sync_fetch_and_add(&e->writers, 1);
    u32 seq = *(volatile u32 *)&e->seq;
    asm volatile("" ::: "memory");
    e->gen = cap->conf.gen;
    e->pc = cap->pc0;
    e->sp = cap->sp0;
    e->bp = cap->bp0;
    e->bp_used = (cap->flags & CAPTURE_BP_USED) != 0;
    e->caller = cap->caller;
    e->stack_id = cap->stack_id;
    e->end = cap->st.end;
    e->words = cap->words;
    asm volatile("" ::: "memory");
    if (*(volatile u32 *)&e->seq != seq)
        e->gen = 0;   /* another write came in the middle of this one */
    *(volatile u32 *)&e->seq = seq + 1;
    __sync_fetch_and_add(&e->writers, -1);
    stack_cache_count(STACK_CACHE_KEPT);
}

/* The walk used the stack word at `at`: note it for the cache, or, if there is no room
 * (or it is not an aligned word of the span), that the walk can't be kept. */
static __always_inline void words_use(struct stack_capture *cap, u64 at, u64 val) {
    u32 n = cap->words.n;
    u64 off = at - cap->sp0;
    if (n >= STACK_CACHE_WORDS || off > STACK_CACHE_SPAN - 8 || (off & 7)) {
        cap->words.n = STACK_WORDS_NONE;
        return;
    }
    asm volatile("" : "+r"(n));   /* see the mask on st.ips below */
    cap->words.val[n & (STACK_CACHE_WORDS - 1)] = val;
    cap->words.off[n & (STACK_CACHE_WORDS - 1)] = off;
    cap->words.n = n + 1;
    if (off + 8 > cap->words.span)
        cap->words.span = off + 8;
}

/* A frame finds its CFA from bp: the walk depends on where bp came from. */
static __always_inline void words_use_bp(struct stack_capture *cap, u64 bp) {
    if (cap->flags & CAPTURE_BP_FIRST)
        cap->flags |= CAPTURE_BP_USED;
    if (cap->flags & CAPTURE_BP_READ) {
        words_use(cap, cap->bp_word_at, bp);
        cap->flags &= ~CAPTURE_BP_READ;   /* noted once */
    }
}

/* The walk's first run: its registers, its process's table in force. 0: no table. */
static __always_inline int unwind_start(struct stack_capture *cap, const struct unwind_regs *r) {
    u32 slot = cap->slot;
    struct unwind_conf *confp = unwind_conf.lookup(&slot);
    if (!confp)
        return 0;
    cap->conf = *confp;
    u64 pc = r->pc, sp = r->sp, bp = r->bp;
    if (!r->have) {
        struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
        bpf_probe_read_kernel(&pc, sizeof(pc), &regs->ip);
        bpf_probe_read_kernel(&sp, sizeof(sp), &regs->sp);
        bpf_probe_read_kernel(&bp, sizeof(bp), &regs->bp);
    }
    cap->pc = cap->pc0 = pc;
    cap->sp = cap->sp0 = sp;
    cap->bp = cap->bp0 = bp;
    cap->flags = CAPTURE_BP_FIRST | (cap->flags & CAPTURE_PC_EXACT);
    cap->words.n = 0;
    cap->words.span = 0;
    return 1;
}

/* The next frame's pc was read from a slot holding a page-aligned value, maybe the
 * uretprobe trampoline: if a pending return instance replaced that slot, its original
 * return address is the frame's pc. */
static __always_inline u64 unwind_fixup(struct stack_capture *cap, u64 pc, u64 sp) {
    cap->flags &= ~CAPTURE_FIXUP;
    if (!(cap->flags & CAPTURE_RETURNS)) {
        unwind_read_returns(&cap->returns);
        cap->flags |= CAPTURE_RETURNS;
    }
#pragma unroll
    for (int r = 0; r < UNWIND_RETURNS; r++) {
        if (cap->returns.slot[r] == sp - 8)
            pc = cap->returns.ret[r];   /* the trampoline stood there */
    }
    return pc;
}

/* Up to `chunk` more frames. Returns 1 when the walk is over (cap->st.end says
 * why), 0 when it should go on. */
static __always_inline int unwind_chunk(struct stack_capture *cap, const u32 chunk) {
    u64 pc = cap->pc, sp = cap->sp, bp = cap->bp;
    u32 n = cap->n;
    struct unwind_conf conf = cap->conf;
    if (cap->flags & CAPTURE_FIXUP)
        pc = unwind_fixup(cap, pc, sp);
    u32 end = NATRACE_END_COUNT;   /* no end: the walk goes on */
#pragma clang loop unroll(disable)
    for (u32 k = 0; k < chunk; k++) {
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
         * mappings (mapped since it was loaded: an attached process's dlopen a moment
         * ago) is walked by
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
        u64 at = i == 0 && (cap->flags & CAPTURE_PC_EXACT) ? pc : pc - 1;
        int known = unwind_find_row(&conf, at, &row) &&
                    row.cfa != NATRACE_CFA_NO_MAPPING;
        if (!known) {
            row.cfa = NATRACE_CFA_FP;
            row.cfa_off = 0;
        }
        u64 cfa;
        if (row.cfa == NATRACE_CFA_FP) {
            /* [rbp] = the caller's rbp, [rbp+8] = the return address */
            words_use_bp(cap, bp);
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
            words_use_bp(cap, bp);
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
        words_use(cap, cfa - 8, ra);
        if (row.rbp == NATRACE_RBP_SAVED) {
            u64 at = cfa + row.rbp_off;
            if (bpf_probe_read_user(&bp, sizeof(bp), (void *)at) != 0) {
                end = NATRACE_END_READ;
                break;
            }
            cap->bp_word_at = at;   /* a word of the walk's once a frame uses it */
            cap->flags = (cap->flags & ~CAPTURE_BP_FIRST) | CAPTURE_BP_READ;
        } else if (row.rbp == NATRACE_RBP_LOST) {
            bp = 0;
            cap->flags &= ~(CAPTURE_BP_FIRST | CAPTURE_BP_READ);
        }
        sp = cfa;
        pc = ra;
        if (ra && (ra & 4095) == 0) {
            /* maybe the uretprobe trampoline: the next run puts the original back
             * first (unwind_fixup); such a walk is not cached */
            cap->flags |= CAPTURE_FIXUP;
            cap->words.n = STACK_WORDS_NONE;
            break;
        }
    }
    cap->pc = pc;
    cap->sp = sp;
    cap->bp = bp;
    cap->n = n;
    int over = end != NATRACE_END_COUNT;
    if (over) {
        cap->st.end = end;
        if (end == NATRACE_END_READ)
            cap->words.n = STACK_WORDS_NONE;
        unwind_count_end(end);
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
static __always_inline u32 stack_walk(void *ctx, const struct unwind_regs *regs,
                                      const u32 chunk) {
    struct stack_capture *cap = capture_resume();
    if (!cap)
        return STACK_SLOTS;
#ifdef UNWIND_CFI
    if (cap->n == 0) {
        if (!(cap->flags & CAPTURE_STARTED)) {
            if (!unwind_start(cap, regs))
                return cap->cont;   /* no table: stack_id stays -EFAULT */
            if (stack_cache_hit(cap))
                return cap->cont;
        }
        /* zero-padded, as stored and as bpf_get_stack leaves it */
        __builtin_memset(cap->st.ips, 0, sizeof(cap->st.ips));
    }
    if (!unwind_chunk(cap, chunk))
        return STACK_WALK;
    stack_store(cap);
    stack_cache_keep(cap);
    return cap->cont;
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

/* For a uprobe's capture site: the stack from the cache without entering the walk
 * program (two tail calls and the continuation's own run spared): 1 if cap->stack_id
 * holds it and the site may run its continuation's work itself; else the site
 * tail-calls the walk, which starts from what is taken here. */
static __always_inline int capture_cached(struct stack_capture *cap, struct pt_regs *ctx) {
#ifdef UNWIND_CFI
    struct unwind_regs regs = {PT_REGS_IP(ctx), PT_REGS_SP(ctx), PT_REGS_FP(ctx), 1};
    if (!unwind_start(cap, &regs))
        return 0;
    cap->flags |= CAPTURE_STARTED;
    return stack_cache_hit(cap);
#else
    return 0;
#endif
}

/* The walk programs: bcc rewrites a map's .call() only in code written out, not in a
 * macro, hence one short function per program array. */
#ifdef STACKS_KP
int tail_kp__0__walk(struct pt_regs *ctx) {
    struct unwind_regs regs = {PT_REGS_IP(ctx), PT_REGS_SP(ctx), PT_REGS_FP(ctx), 1};
    u32 next = stack_walk(ctx, &regs, STACK_CHUNK);
    if (next < STACK_SLOTS) {
        tail_kp.call(ctx, next);
        stack_drop();
    }
    return 0;
}
#endif

#ifdef STACKS_TP
int tail_tp__0__walk(void *ctx) {
    struct unwind_regs regs = {};
    u32 next = stack_walk(ctx, &regs, STACK_CHUNK_TP);
    if (next < STACK_SLOTS) {
        tail_tp.call(ctx, next);
        stack_drop();
    }
    return 0;
}
#endif

#endif
