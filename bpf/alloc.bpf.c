/* Native allocation tracing: the malloc family through uprobes, anonymous
 * mappings through syscall tracepoints.
 *
 * malloc/free run millions of times a second, so they are aggregated here, in
 * the kernel: outstanding blocks by address (allocs) and atomic per-stack
 * counters (sites). mmap/munmap/mremap/brk are rare enough to stream to Python,
 * which handles them as range operations (partial munmap, mremap).
 *
 * Compile-time parameters (set by tracer/probes/alloc.py):
 *   WAIT_EXEC        defined when natrace launched the target: record nothing
 *                    until the child has exec'd the command
 *   SAMPLE_BYTES     0 for exact tracing, else the byte-weighted sampling period
 *   MAX_ALLOCS, MAX_STACKS, STACK_DEPTH, RINGBUF_PAGES
 */
#include <uapi/linux/ptrace.h>
#include "natrace.h"
#include "target.bpf.h"
#include "stacks.bpf.h"

BPF_HASH(allocs, u64, struct alloc_info, MAX_ALLOCS);
BPF_HASH(sites, s32, struct site_stats, MAX_STACKS + 16);
BPF_TABLE("lru_hash", u32, struct entry_state, entries, 65536);
BPF_PERCPU_ARRAY(counters, u64, NATRACE_NCOUNTERS);
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

static __always_inline s32 capture_stack(void *ctx) {
    s32 id = user_stack_id(ctx);
    if (id >= 0)
        return id;
    if (id == -EFAULT)
        count(NATRACE_CNT_STACK_EFAULT, 1);
    else if (id == -ENOSPC)
        count(NATRACE_CNT_STACK_FULL, 1);
    else if (id == -ENOMEM)
        count(NATRACE_CNT_STACK_ENOMEM, 1);
    else
        count(NATRACE_CNT_STACK_OTHER, 1);
    return id;   /* kept as its own bucket: -errno, never a fake stack */
}

/* Weights of one recorded block: exact in unsampled mode; in sampled mode a
 * block of `size` was kept with probability size/SAMPLE_BYTES (1 when larger),
 * so it stands for max(size, SAMPLE_BYTES) bytes and 1/p blocks. */
static __always_inline u64 weight_bytes(u64 size) {
#if SAMPLE_BYTES > 0
    return size >= SAMPLE_BYTES ? size : SAMPLE_BYTES;
#else
    return size;
#endif
}

static __always_inline u64 weight_blocks_fp(u64 size) {
#if SAMPLE_BYTES > 0
    if (size < SAMPLE_BYTES)
        return ((u64)SAMPLE_BYTES << NATRACE_BLOCK_SHIFT) / (size ? size : 1);
#endif
    return 1ULL << NATRACE_BLOCK_SHIFT;
}

static __always_inline void release(u64 addr) {
    struct alloc_info *found = allocs.lookup(&addr);
    if (!found)
        return;
    struct alloc_info info = *found;
    if (allocs.delete(&addr) != 0)
        return;   /* another path released it first */
    struct site_stats *s = sites.lookup(&info.stack_id);
    if (s) {
        __sync_fetch_and_add(&s->bytes, -(s64)weight_bytes(info.size));
        __sync_fetch_and_add(&s->blocks_fp, -(s64)weight_blocks_fp(info.size));
    }
    count(NATRACE_CNT_FREE_CALLS, 1);
}

static __always_inline void record(void *ctx, u64 addr, u64 size) {
    count(NATRACE_CNT_ALLOC_CALLS, 1);
#if SAMPLE_BYTES > 0
    if (size < SAMPLE_BYTES && (bpf_get_prandom_u32() % SAMPLE_BYTES) >= size) {
        count(NATRACE_CNT_SAMPLED_OUT, 1);
        return;
    }
#endif
    struct alloc_info info = {};
    info.size = size;
    info.ts_ns = bpf_ktime_get_ns();
    info.stack_id = capture_stack(ctx);

    struct site_stats *s = sites.lookup(&info.stack_id);
    if (!s) {
        struct site_stats zero = {};
        sites.insert(&info.stack_id, &zero);
        s = sites.lookup(&info.stack_id);
        if (!s) {
            count(NATRACE_CNT_SITES_FULL, 1);
            count(NATRACE_CNT_UNTRACKED_BYTES, size);
            return;
        }
    }
    /* Insert-if-absent spares a lookup on every allocation; an address already
     * there was released by a path we don't see: drop the old record first. */
    int err = allocs.insert(&addr, &info);
    if (err == -EEXIST) {
        release(addr);
        count(NATRACE_CNT_STALE, 1);
        err = allocs.insert(&addr, &info);
    }
    if (err != 0) {
        count(NATRACE_CNT_UNTRACKED, 1);
        count(NATRACE_CNT_UNTRACKED_BYTES, size);
        return;
    }
    u64 wb = weight_bytes(size), wn = weight_blocks_fp(size);
    __sync_fetch_and_add(&s->bytes, (s64)wb);
    __sync_fetch_and_add(&s->blocks_fp, (s64)wn);
    __sync_fetch_and_add(&s->allocs_fp, wn);
    __sync_fetch_and_add(&s->alloc_bytes, wb);
}

/* Entry: only the outermost allocator call of a thread is recorded. Wrappers
 * without frame pointers (strdup, operator new) are probed as outermost calls so
 * that the stack taken at their return starts at their caller; the size is that
 * of the first allocation made inside them. */
static __always_inline int enter(u32 kind, u64 size, u64 ptr) {
    if (!is_armed())
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct entry_state *st = entries.lookup(&tid);
    if (st) {
        if (st->depth++ > 0) {
            if (st->kind == NATRACE_FN_WRAPPER && st->size == 0)
                st->size = size;
            return 0;
        }
        st->size = size;
        st->ptr = ptr;
        st->kind = kind;
        return 0;
    }
    struct entry_state fresh = {.size = size, .ptr = ptr, .depth = 1, .kind = kind};
    entries.update(&tid, &fresh);
    return 0;
}

int malloc_enter(struct pt_regs *ctx) {
    return enter(NATRACE_FN_MALLOC, PT_REGS_PARM1(ctx), 0);
}

int calloc_enter(struct pt_regs *ctx) {
    return enter(NATRACE_FN_CALLOC, PT_REGS_PARM1(ctx) * PT_REGS_PARM2(ctx), 0);
}

int realloc_enter(struct pt_regs *ctx) {
    return enter(NATRACE_FN_REALLOC, PT_REGS_PARM2(ctx), PT_REGS_PARM1(ctx));
}

int reallocarray_enter(struct pt_regs *ctx) {
    return enter(NATRACE_FN_REALLOC, PT_REGS_PARM2(ctx) * PT_REGS_PARM3(ctx), PT_REGS_PARM1(ctx));
}

int memalign_enter(struct pt_regs *ctx) {
    return enter(NATRACE_FN_MEMALIGN, PT_REGS_PARM2(ctx), 0);
}

int wrapper_enter(struct pt_regs *ctx) {
    return enter(NATRACE_FN_WRAPPER, 0, 0);
}

int posix_memalign_enter(struct pt_regs *ctx) {
    return enter(NATRACE_FN_POSIX_MEMALIGN, PT_REGS_PARM3(ctx), PT_REGS_PARM1(ctx));
}

/* Return: frame 0 of the stack taken here is the allocator's real caller. */
int alloc_return(struct pt_regs *ctx) {
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct entry_state *st = entries.lookup(&tid);
    if (!st || st->depth == 0)
        return 0;   /* the call began before natrace attached */
    if (--st->depth > 0)
        return 0;
    u64 ret = PT_REGS_RC(ctx);
    u64 size = st->size, ptr = st->ptr, block = 0;
    switch (st->kind) {
    case NATRACE_FN_POSIX_MEMALIGN:
        if (ret != 0 || bpf_probe_read_user(&block, sizeof(block), (void *)ptr) != 0)
            block = 0;
        break;
    case NATRACE_FN_REALLOC:
        if (ret) {
            if (ptr)
                release(ptr);
            block = ret;
        } else if (size == 0 && ptr) {
            release(ptr);   /* realloc(p, 0) freed p */
        }
        break;
    default:
        block = ret;
    }
    /* one call site of record(): the stack walk it inlines is verified once */
    if (block)
        record(ctx, block, size);
    return 0;
}

int free_enter(struct pt_regs *ctx) {
    u64 ptr = PT_REGS_PARM1(ctx);
    if (ptr)
        release(ptr);
    return 0;
}

/* ---- anonymous mappings ------------------------------------------------ */

static __always_inline int syscall_enter(u64 a0, u64 a1, u64 a2, u64 a3, u32 flags) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!is_target(pid_tgid) || !is_armed())
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

static __always_inline int syscall_exit(void *ctx, u32 kind, long ret) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!is_target(pid_tgid))
        return 0;
    u32 tid = (u32)pid_tgid;
    struct syscall_args *args = pending.lookup(&tid);
    if (!args)
        return 0;
    struct syscall_args a = *args;
    pending.delete(&tid);
    if (ret < 0 && ret > -4096)
        return 0;   /* failed calls change no mapping */

    struct mem_event *ev = mem_events.ringbuf_reserve(sizeof(struct mem_event));
    if (!ev) {
        count(NATRACE_CNT_EVENTS_LOST, 1);
        return 0;
    }
    ev->ts_ns = bpf_ktime_get_ns();
    ev->kind = kind;
    ev->flags = a.flags;
    ev->tid = tid;
    ev->new_addr = 0;
    ev->new_len = 0;
    ev->caller = a.caller;
    ev->stack_id = 0;
    switch (kind) {
    case NATRACE_EV_MMAP:
        ev->addr = ret;
        ev->len = a.a1;
        ev->stack_id = (a.flags & NATRACE_EVF_ANON) ? capture_stack(ctx) : 0;
        if ((a.flags & NATRACE_EVF_EXEC) && !(a.flags & NATRACE_EVF_ANON))
            stop_for_unwind_rows();
        break;
    case NATRACE_EV_MUNMAP:
        ev->addr = a.a0;
        ev->len = a.a1;
        break;
    case NATRACE_EV_MREMAP:
        ev->addr = a.a0;
        ev->len = a.a1;
        ev->new_len = a.a2;
        ev->new_addr = ret;
        break;
    case NATRACE_EV_BRK:
        ev->addr = ret;
        ev->len = 0;
        ev->stack_id = capture_stack(ctx);
        break;
    }
    mem_events.ringbuf_submit(ev, BPF_RB_NO_WAKEUP);
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
