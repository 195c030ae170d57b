/* Native allocation tracing: the malloc family through uprobes, anonymous
 * mappings through syscall tracepoints.
 *
 * malloc/free run millions of times a second, so they are aggregated here, in
 * the kernel: outstanding blocks by address (allocs) and per-CPU per-stack
 * counters (sites: each CPU adds to its own copy, so no call writes a cache line
 * another CPU writes; Python sums the copies). mmap/munmap/mremap/brk are rare enough to stream to Python,
 * which handles them as range operations (partial munmap, mremap).
 *
 * Compile-time parameters (set by tracer/probes/alloc.py):
 *   WAIT_EXEC        defined when natrace launched the target: record nothing
 *                    until the child has exec'd the command
 *   SAMPLE_BYTES     0 for exact tracing, else the byte-weighted sampling period
 *   USDT_SAMPLED     defined when the process samples itself (sampler/): only the
 *                    otel_memory:alloc/free USDT probes are attached, each sampled
 *                    block recorded with the weight the process gave it
 *   TARGET_PAGE_SIZE what pvalloc rounds sizes up to
 *   MAX_ALLOCS, MAX_STACKS, STACK_DEPTH, RINGBUF_PAGES
 */
#include <uapi/linux/ptrace.h>
#include "natrace.h"
#include "target.bpf.h"

/* What the continuations of a stack capture (stacks.bpf.h) need of their event. */
struct capture_event {
    u64 addr, size, ts_ns, weight;   /* record(): the block */
    struct mem_event mem;            /* syscall_exit(): the event, its stack to come */
};
#define STACKS_KP 1       /* allocations, from uprobes: tail_kp */
#define STACKS_TP 1       /* mmap and brk, from syscall tracepoints: tail_tp */
#define CONT_RECORD 1     /* tail_kp__1__record_block */
#define CONT_MEM_EVENT 1  /* tail_tp__1__mem_event */
#include "stacks.bpf.h"

BPF_HASH(allocs, struct alloc_key, struct alloc_info, MAX_ALLOCS);
/* Allocated on insert: per-CPU values cost (CPUs x 64 B) per site, only for sites seen. */
BPF_F_TABLE("percpu_hash", struct site_key, struct site_stats, sites, MAX_STACKS + 16,
            BPF_F_NO_PREALLOC);
BPF_TABLE("lru_hash", u32, struct entry_state, entries, 65536);
BPF_PERCPU_ARRAY(counters, u64, NATRACE_NCOUNTERS);
/* Processes and threads the traced processes forked, by pid (threads dropped at exit). */
BPF_TABLE("lru_hash", u32, struct natrace_fork, forks, 4096);
BPF_ARRAY(follow_children, u32, 1);   /* 1: trace the processes a traced one forks */
BPF_RINGBUF_OUTPUT(mem_events, RINGBUF_PAGES);

struct syscall_args {
    u64 a0, a1, a2, a3;
    u64 caller;     /* return address into the syscall wrapper's caller */
    u32 flags;
};
BPF_HASH(pending, u32, struct syscall_args, 16384);

static __always_inline void count(u32 which, u64 n) {
    u64 *c = counters.lookup(&which);
    if (c)
        *c += n;   /* per-CPU slot: no atomic needed */
}

/* A failed stack capture's -errno, counted; the event keeps it as its own bucket,
 * never a fake stack. */
static __always_inline void count_stack_error(s32 id) {
    if (id >= 0)
        return;
    if (id == -EFAULT)
        count(NATRACE_CNT_STACK_EFAULT, 1);
    else if (id == -ENOSPC)
        count(NATRACE_CNT_STACK_FULL, 1);
    else if (id == -ENOMEM)
        count(NATRACE_CNT_STACK_ENOMEM, 1);
    else
        count(NATRACE_CNT_STACK_OTHER, 1);
}

/* Weights of one recorded block: exact in unsampled mode; in sampled mode a
 * block of `size` was kept with probability size/SAMPLE_BYTES (1 when larger),
 * so it stands for max(size, SAMPLE_BYTES) bytes and 1/p blocks. Sampled in the
 * process, it stands for the probe's weight in bytes and weight/size blocks. */
static __always_inline u64 weight_bytes(const struct alloc_info *info) {
#if defined(USDT_SAMPLED)
    return info->weight;
#elif SAMPLE_BYTES > 0
    return info->size >= SAMPLE_BYTES ? info->size : SAMPLE_BYTES;
#else
    return info->size;
#endif
}

static __always_inline u64 weight_blocks_fp(const struct alloc_info *info) {
    u64 size = info->size ? info->size : 1;
#if defined(USDT_SAMPLED)
    return (info->weight << NATRACE_BLOCK_SHIFT) / size;
#elif SAMPLE_BYTES > 0
    if (size < SAMPLE_BYTES)
        return ((u64)SAMPLE_BYTES << NATRACE_BLOCK_SHIFT) / size;
#endif
    return 1ULL << NATRACE_BLOCK_SHIFT;
}

/* `st`: the releasing thread's entry state (NULL if it has none): freeing the block
 * it recorded last makes that block a temporary allocation. */
static __always_inline void release(u32 tgid, u64 addr, struct entry_state *st) {
    struct alloc_key key = {.addr = addr, .tgid = tgid};
    struct alloc_info *found = allocs.lookup(&key);
    if (!found)
        return;
    struct alloc_info info = *found;
    if (allocs.delete(&key) != 0)
        return;   /* another path released it first */
    int temporary = st && st->last == addr;
    struct site_key sk = {.stack_id = info.stack_id, .tgid = tgid};
    struct site_stats *s = sites.lookup(&sk);
    if (s) {
        u64 wb = weight_bytes(&info), wn = weight_blocks_fp(&info);
        s->bytes -= (s64)wb;   /* this CPU's copy: no atomic */
        s->blocks_fp -= (s64)wn;
        if (temporary) {
            s->temp_fp += wn;
            s->temp_bytes += wb;
        }
#if defined(USDT_SAMPLED)
        s->samples -= 1;
#elif SAMPLE_BYTES > 0
        if (info.size < SAMPLE_BYTES)
            s->samples -= 1;
#endif
    }
    if (temporary)
        st->last = 0;
    count(NATRACE_CNT_FREE_CALLS, 1);
}

/* `weight`: the process's own estimate (USDT_SAMPLED), else unused. The block is
 * recorded by record_block once its stack is taken (stacks.bpf.h). */
static __always_inline void record(struct pt_regs *ctx, u64 addr, u64 size, u64 caller,
                                   u64 weight) {
    count(NATRACE_CNT_ALLOC_CALLS, 1);
#if SAMPLE_BYTES > 0
    if (size < SAMPLE_BYTES && (bpf_get_prandom_u32() % SAMPLE_BYTES) >= size) {
        count(NATRACE_CNT_SAMPLED_OUT, 1);
        return;
    }
#endif
    struct stack_capture *cap = capture_begin(CONT_RECORD, caller);
    if (cap) {
        cap->ev.addr = addr;
        cap->ev.size = size;
        cap->ev.ts_ns = bpf_ktime_get_ns();
        cap->ev.weight = weight;
        tail_kp.call(ctx, STACK_WALK);
        stack_drop();
    }
    count(NATRACE_CNT_UNTRACKED, 1);
    count(NATRACE_CNT_UNTRACKED_BYTES, size);
}

int tail_kp__1__record_block(struct pt_regs *ctx) {
    struct stack_capture *cap = capture_resume();
    if (!cap)
        return 0;
    u64 addr = cap->ev.addr, size = cap->ev.size;
    struct alloc_info info = {};
    info.size = size;
    info.ts_ns = cap->ev.ts_ns;
    info.stack_id = cap->stack_id;
    count_stack_error(info.stack_id);
#ifdef USDT_SAMPLED
    info.weight = cap->ev.weight;
#endif

    u32 tgid = bpf_get_current_pid_tgid() >> 32;   /* the continuation runs in the caller */
    struct site_key sk = {.stack_id = info.stack_id, .tgid = tgid};
    struct site_stats *s = sites.lookup(&sk);
    if (!s) {
        struct site_stats zero = {.first_ns = info.ts_ns};
        sites.insert(&sk, &zero);
        s = sites.lookup(&sk);
        if (!s) {
            count(NATRACE_CNT_SITES_FULL, 1);
            count(NATRACE_CNT_UNTRACKED_BYTES, size);
            return 0;
        }
    }
    /* Insert-if-absent spares a lookup on every allocation; an address already
     * there was released by a path we don't see: drop the old record first. */
    struct alloc_key key = {.addr = addr, .tgid = tgid};
    int err = allocs.insert(&key, &info);
    if (err == -EEXIST) {
        release(tgid, addr, NULL);
        count(NATRACE_CNT_STALE, 1);
        err = allocs.insert(&key, &info);
    }
    if (err != 0) {
        count(NATRACE_CNT_UNTRACKED, 1);
        count(NATRACE_CNT_UNTRACKED_BYTES, size);
        return 0;
    }
    u64 wb = weight_bytes(&info), wn = weight_blocks_fp(&info);
    s->bytes += (s64)wb;   /* this CPU's copy: no atomic */
    s->blocks_fp += (s64)wn;
    s->allocs_fp += wn;
    s->alloc_bytes += wb;
    s->last_ns = info.ts_ns;
#if defined(USDT_SAMPLED)
    s->samples += 1;
    s->alloc_samples += 1;
#elif SAMPLE_BYTES > 0
    if (size < SAMPLE_BYTES) {
        s->samples += 1;
        s->alloc_samples += 1;
    }
#endif
    return 0;
}

#ifdef USDT_SAMPLED
/* otel_memory:alloc(ptr, size, weight) and otel_memory:free(ptr), fired by the process
 * for the allocations it sampled; arguments in the SysV argument registers (checked
 * against the probe notes by tracer/probes/usdt.py). The stack is taken here, so its
 * innermost frames are the sampler's own frame-pointer frames (charged past, like
 * malloc's). The free probe gets free_enter: its pointer is the first argument too.
 * (A program of its own: verified apart from alloc_return's record().) */
int otel_alloc(struct pt_regs *ctx) {
    u64 ptr = PT_REGS_PARM1(ctx), size = PT_REGS_PARM2(ctx), weight = PT_REGS_PARM3(ctx);
    if (is_armed() && ptr && weight)
        record(ctx, ptr, size, 0, weight);
    return 0;
}
#endif

/* Is `slot` (an outer call's return-address slot) the uretprobe trampoline? There is
 * one per process, at the start of its [uprobes] page (not inherited by a fork); its
 * code starts with `push %rax; push %rcx; push %r11` (the uretprobe syscall, 6.11+) or
 * int3. Once seen, it is known (in the process's `targets` entry). Until then, a page
 * never executed can't be read here: a page-aligned address that can't be read may be
 * a trampoline not yet run, taken as one (the call lives). */
static __always_inline int is_trampoline(struct natrace_proc *p, u64 slot) {
    if (p->trampoline)
        return p->trampoline == slot;
    u32 code = 0;
    if (bpf_probe_read_user(&code, sizeof(code), (void *)slot) != 0)
        return slot && (slot & 4095) == 0;
    if (code != 0x53415150 && (code & 0xff) != 0xcc)
        return 0;
    p->trampoline = slot;
    return 1;
}

/* Is the thread's outermost recorded call still running, seen from a call entered at
 * `sp`? Not if `sp` is above its frame (it is gone), nor if its return-address slot no
 * longer holds the trampoline (the stack was reused after a longjmp past it). */
static __always_inline int outer_live(struct natrace_proc *p, struct entry_state *st, u64 sp) {
    if (sp > st->sp)
        return 0;
    u64 slot = 0;
    if (bpf_probe_read_user(&slot, sizeof(slot), (void *)st->sp) != 0)
        return 0;
    return is_trampoline(p, slot);
}

/* Is the thread's wrapper (operator new, strdup) still running around a call at `sp`?
 * Its return address is still in its slot while it lives. */
static __always_inline int wrapper_live(struct entry_state *st, u64 sp) {
    if (st->wrap_sp == 0 || sp >= st->wrap_sp)
        return 0;
    u64 slot = 0;
    return bpf_probe_read_user(&slot, sizeof(slot), (void *)st->wrap_sp) == 0 &&
           slot == st->wrap_caller;
}

static __always_inline struct entry_state *thread_state(u32 tid) {
    struct entry_state *st = entries.lookup(&tid);
    if (st)
        return st;
    struct entry_state fresh = {};
    entries.update(&tid, &fresh);
    return entries.lookup(&tid);
}

/* Entry: only the outermost allocator call of a thread is recorded; a call found
 * nested in one that is gone starts afresh (the lost one is counted). */
static __always_inline int enter(struct pt_regs *ctx, u32 kind, u64 size, u64 ptr) {
    struct natrace_proc *p = armed_proc();
    if (!p)
        return 0;
    u64 sp = PT_REGS_SP(ctx);
    struct entry_state *st = thread_state((u32)bpf_get_current_pid_tgid());
    if (!st)
        return 0;
    if (st->depth > 0) {
        if (outer_live(p, st, sp)) {
            st->depth++;
            return 0;
        }
        count(NATRACE_CNT_UNRETURNED, 1);
    }
    st->depth = 1;
    st->size = size;
    st->ptr = ptr;
    st->kind = kind;
    st->sp = sp;
    st->caller = wrapper_live(st, sp) ? st->wrap_caller : 0;
    return 0;
}

/* n * size into *out; 0 when it overflows (such a call fails). */
static __always_inline int product(u64 n, u64 size, u64 *out) {
    if ((n | size) >> 32) {
        /* volatile: LLVM would turn the check into a 128-bit multiply BPF lacks */
        volatile u64 limit = size ? ~0ULL / size : ~0ULL;
        if (n > limit)
            return 0;
    }
    *out = n * size;
    return 1;
}

int malloc_enter(struct pt_regs *ctx) {
    return enter(ctx, NATRACE_FN_MALLOC, PT_REGS_PARM1(ctx), 0);
}

int calloc_enter(struct pt_regs *ctx) {
    u64 size;
    if (!product(PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), &size))
        return enter(ctx, NATRACE_FN_FAILED, 0, 0);
    return enter(ctx, NATRACE_FN_CALLOC, size, 0);
}

int realloc_enter(struct pt_regs *ctx) {
    return enter(ctx, NATRACE_FN_REALLOC, PT_REGS_PARM2(ctx), PT_REGS_PARM1(ctx));
}

int reallocarray_enter(struct pt_regs *ctx) {
    u64 size;
    if (!product(PT_REGS_PARM2(ctx), PT_REGS_PARM3(ctx), &size))
        return enter(ctx, NATRACE_FN_FAILED, 0, 0);   /* never realloc(p, 0): p stays */
    return enter(ctx, NATRACE_FN_REALLOC, size, PT_REGS_PARM1(ctx));
}

/* pvalloc reserves whole pages: its size rounded up to the page size. */
int pvalloc_enter(struct pt_regs *ctx) {
    u64 size = PT_REGS_PARM1(ctx);
    if (size > ~0ULL - (TARGET_PAGE_SIZE - 1))
        return enter(ctx, NATRACE_FN_FAILED, 0, 0);
    size = (size + TARGET_PAGE_SIZE - 1) & ~(u64)(TARGET_PAGE_SIZE - 1);
    return enter(ctx, NATRACE_FN_MALLOC, size, 0);
}

int memalign_enter(struct pt_regs *ctx) {
    return enter(ctx, NATRACE_FN_MEMALIGN, PT_REGS_PARM2(ctx), 0);
}

int posix_memalign_enter(struct pt_regs *ctx) {
    return enter(ctx, NATRACE_FN_POSIX_MEMALIGN, PT_REGS_PARM3(ctx), PT_REGS_PARM1(ctx));
}

/* A wrapper's entry (no uretprobe): keep the return address into its caller, unless
 * it runs inside an allocator call or another wrapper (nothrow new -> new), whose
 * caller is the one that counts. */
int wrapper_enter(struct pt_regs *ctx) {
    struct natrace_proc *p = armed_proc();
    if (!p)
        return 0;
    u64 sp = PT_REGS_SP(ctx), ret = 0;
    if (bpf_probe_read_user(&ret, sizeof(ret), (void *)sp) != 0)
        return 0;
    struct entry_state *st = thread_state((u32)bpf_get_current_pid_tgid());
    if (!st || (st->depth > 0 && outer_live(p, st, sp)) || wrapper_live(st, sp))
        return 0;
    st->wrap_sp = sp;
    st->wrap_caller = ret;
    return 0;
}

/* Return: frame 0 of the stack taken here is the allocator's real caller (a wrapper's
 * caller is spliced in after it). */
int alloc_return(struct pt_regs *ctx) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tid = (u32)pid_tgid, tgid = pid_tgid >> 32;
    struct entry_state *st = entries.lookup(&tid);
    if (!st || st->depth == 0)
        return 0;   /* the call began before natrace attached */
    if (--st->depth > 0)
        return 0;
    u64 ret = PT_REGS_RC(ctx);
    u64 size = st->size, ptr = st->ptr, caller = st->caller, block = 0;
    switch (st->kind) {
    case NATRACE_FN_FAILED:
        return 0;
    case NATRACE_FN_POSIX_MEMALIGN:
        if (ret != 0 || bpf_probe_read_user(&block, sizeof(block), (void *)ptr) != 0)
            block = 0;
        break;
    case NATRACE_FN_REALLOC:
        if (ret) {
            if (ptr)
                release(tgid, ptr, st);
            block = ret;
        } else if (size == 0 && ptr) {
            release(tgid, ptr, st);   /* realloc(p, 0) freed p */
        }
        break;
    default:
        block = ret;
    }
    if (block) {
        st->last = block;   /* a free of it before it is recorded finds nothing */
        record(ctx, block, size, caller, 0);
    }
    return 0;
}

/* Every process (and thread) a traced process forks is kept, so a report names those
 * natrace does not trace. */
TRACEPOINT_PROBE(sched, sched_process_fork) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct natrace_proc *p = target_proc(pid_tgid);
    if (!p || !p->armed)
        return 0;
    u32 child = args->child_pid;
    struct natrace_fork f = {.parent = pid_tgid >> 32};
    bpf_get_current_comm(f.comm, sizeof(f.comm));   /* a child's comm is its parent's */
    forks.update(&child, &f);
    return 0;
}

/* A child process returning from its fork, in its own context before its first
 * instruction: when natrace follows children, it becomes a target and stops itself
 * until natrace has attached its uprobes (they are per process) and resumes it. */
static __always_inline int born(long ret) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    if (ret != 0 || (u32)pid_tgid != tgid)
        return 0;   /* the parent's return, or a new thread */
    int zero = 0;
    u32 *on = follow_children.lookup(&zero);
    struct natrace_fork *f = forks.lookup(&tgid);
    if (!on || !*on || !f)
        return 0;
    struct natrace_proc *parent = targets.lookup(&f->parent);
    if (!parent || !parent->armed)
        return 0;
    struct natrace_proc child = {.armed = 1, .stop = NATRACE_STOP_FORK, .parent = f->parent,
                                .follow = 1};
    if (targets.insert(&tgid, &child) != 0)
        return 0;   /* no room: named in the report as not traced */
    f->traced = 1;
    bpf_send_signal(19 /* SIGSTOP */);
    return 0;
}
TRACEPOINT_PROBE(syscalls, sys_exit_clone) { return born(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_clone3) { return born(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_fork) { return born(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_vfork) { return born(args->ret); }

/* A thread that ends inside an allocator call (killed, pthread_exit from a signal
 * handler) leaves its state behind: drop it, counted. */

TRACEPOINT_PROBE(sched, sched_process_exit) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tid = (u32)pid_tgid;
    struct natrace_fork *forked = forks.lookup(&tid);
    if (forked) {
        if ((pid_tgid >> 32) != tid) {
            forks.delete(&tid);   /* one of the target's threads */
        } else {
            bpf_get_current_comm(forked->comm, sizeof(forked->comm));
            forked->exited = 1;
        }
    }
    if (!is_target(pid_tgid))
        return 0;
    struct entry_state *st = entries.lookup(&tid);
    if (!st)
        return 0;
    if (st->depth > 0)
        count(NATRACE_CNT_UNRETURNED, 1);
    entries.delete(&tid);
    return 0;
}

int free_enter(struct pt_regs *ctx) {
    u64 ptr = PT_REGS_PARM1(ctx);
    if (!ptr)
        return 0;
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tid = (u32)pid_tgid;
    release(pid_tgid >> 32, ptr, entries.lookup(&tid));
    return 0;
}

/* ---- anonymous mappings ------------------------------------------------ */

static __always_inline int syscall_enter(u64 a0, u64 a1, u64 a2, u64 a3, u32 flags) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct natrace_proc *p = target_proc(pid_tgid);
    if (!p || !p->armed)
        return 0;
    u32 tid = (u32)pid_tgid;
    struct syscall_args args = {.a0 = a0, .a1 = a1, .a2 = a2, .a3 = a3, .flags = flags};
    struct entry_state *st = entries.lookup(&tid);
    if (st && st->depth > 0)
        args.flags |= NATRACE_EVF_ALLOCATOR;
    /* *sp: the wrapper's caller (see user_sp) */
    bpf_probe_read_user(&args.caller, sizeof(args.caller), (void *)user_sp());
    pending.update(&tid, &args);
    return 0;
}

static __always_inline void emit_mem_event(const struct mem_event *e) {
    struct mem_event *ev = mem_events.ringbuf_reserve(sizeof(struct mem_event));
    if (!ev) {
        count(NATRACE_CNT_EVENTS_LOST, 1);
        return;
    }
    *ev = *e;
    mem_events.ringbuf_submit(ev, BPF_RB_NO_WAKEUP);
}

static __always_inline int syscall_exit(void *ctx, u32 kind, long ret) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct natrace_proc *p = target_proc(pid_tgid);
    if (!p)
        return 0;
    u32 tid = (u32)pid_tgid;
    struct syscall_args *args = pending.lookup(&tid);
    if (!args)
        return 0;
    struct syscall_args a = *args;
    pending.delete(&tid);
    if (ret < 0 && ret > -4096)
        return 0;   /* failed calls change no mapping */

    struct mem_event e = {};
    e.ts_ns = bpf_ktime_get_ns();
    e.kind = kind;
    e.flags = a.flags;
    e.tid = tid;
    e.tgid = pid_tgid >> 32;
    e.caller = a.caller;
    int stack = 0;
    switch (kind) {
    case NATRACE_EV_MMAP:
        e.addr = ret;
        e.len = a.a1;
        stack = a.flags & NATRACE_EVF_ANON;
        if ((a.flags & NATRACE_EVF_EXEC) && !(a.flags & NATRACE_EVF_ANON) && !p->parent)
            stop_for_unwind_rows();   /* the table is of the launched process's code */
        break;
    case NATRACE_EV_MUNMAP:
        e.addr = a.a0;
        e.len = a.a1;
        break;
    case NATRACE_EV_MREMAP:
        e.addr = a.a0;
        e.len = a.a1;
        e.new_len = a.a2;
        e.new_addr = ret;
        break;
    case NATRACE_EV_BRK:
        e.addr = ret;
        stack = 1;
        break;
    }
    if (stack) {
        struct stack_capture *cap = capture_begin(CONT_MEM_EVENT, 0);
        if (cap) {
            cap->ev.mem = e;
            tail_tp.call(ctx, STACK_WALK);
            stack_drop();
        }
        e.stack_id = -ENOEXEC;   /* no walk program: natrace is detaching */
        count_stack_error(e.stack_id);
    }
    emit_mem_event(&e);
    return 0;
}

/* An mmap or brk event once its stack is taken. */
int tail_tp__1__mem_event(void *ctx) {
    struct stack_capture *cap = capture_resume();
    if (!cap)
        return 0;
    struct mem_event e = cap->ev.mem;
    e.stack_id = cap->stack_id;
    count_stack_error(e.stack_id);
    emit_mem_event(&e);
    return 0;
}

#define MAP_ANONYMOUS_FLAG 0x20
#define PROT_EXEC_FLAG 0x4

TRACEPOINT_PROBE(syscalls, sys_enter_mmap) {
    u32 flags = (args->flags & MAP_ANONYMOUS_FLAG) ? NATRACE_EVF_ANON : 0;
    if (args->prot & PROT_EXEC_FLAG)
        flags |= NATRACE_EVF_EXEC;
    return syscall_enter(args->addr, args->len, args->prot, args->flags, flags);
}
TRACEPOINT_PROBE(syscalls, sys_exit_mmap) { return syscall_exit(args, NATRACE_EV_MMAP, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_munmap) { return syscall_enter(args->addr, args->len, 0, 0, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_munmap) { return syscall_exit(args, NATRACE_EV_MUNMAP, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_mremap) {
    return syscall_enter(args->addr, args->old_len, args->new_len, args->flags, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_mremap) { return syscall_exit(args, NATRACE_EV_MREMAP, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_brk) { return syscall_enter(args->brk, 0, 0, 0, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_brk) { return syscall_exit(args, NATRACE_EV_BRK, args->ret); }
