/* Native allocation tracing: the malloc family through uprobes, anonymous
 * mappings through raw_syscalls or, when nothing else needs those, uprobes at the
 * syscall instructions of libc's and the loader's wrappers.
 *
 * malloc/free run millions of times a second, so they are aggregated here, in
 * the kernel: outstanding blocks by address (blocks) and per-CPU per-stack
 * counters (sites: each CPU adds to its own copy, so no call writes a cache line
 * another CPU writes; Python sums the copies). mmap/munmap/mremap/mprotect/brk are
 * rare enough to stream to Python, which handles them as range operations (partial
 * munmap, mremap, a reservation's pieces made accessible).
 *
 * Compile-time parameters (set by tracer/probes/alloc.py):
 *   WAIT_EXEC        defined when natrace launched the target: record nothing
 *                    until the child has exec'd the command
 *   SAMPLE_BYTES     0 for exact tracing, else the byte-weighted sampling period
 *   USDT_SAMPLED     defined when the process samples itself (sampler/): only the
 *                    otel_memory:alloc/free USDT probes are attached, each sampled
 *                    block recorded with the weight the process gave it
 *   TARGET_PAGE_SIZE what pvalloc rounds sizes up to
 *   BUCKET_BITS      log2 of the outstanding-block table's buckets (blocks)
 *   MAX_SPILLS       blocks the spill hash (allocs) holds, for full buckets
 *   MAX_STACKS, STACK_DEPTH, RINGBUF_PAGES
 */
#include <uapi/linux/ptrace.h>
#include "natrace.h"

BPF_RINGBUF_OUTPUT(mem_events, RINGBUF_PAGES);
/* A traced process stopped itself for natrace (at birth, exec, _Exit): one event that
 * wakes natrace's poll at once (tracer/engine/session.py waits on the ring buffer),
 * where mapping events never wake it. natrace's production mode polls every 0.5 s: a
 * shell loop running /bin/true 10 times took 12-14 s under it (0.6-2.0 s woken). */
static __always_inline void wake_natrace(void) {
    struct mem_event *ev = mem_events.ringbuf_reserve(sizeof(struct mem_event));
    if (!ev)
        return;   /* full: natrace's next poll finds the stop */
    __builtin_memset(ev, 0, sizeof(*ev));
    ev->kind = NATRACE_EV_STOP;
    ev->tgid = bpf_get_current_pid_tgid() >> 32;
    mem_events.ringbuf_submit(ev, BPF_RB_FORCE_WAKEUP);
}
#define STOPPED_FOR_NATRACE() wake_natrace()
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
#define CONT_SITE_EVENT 2 /* tail_kp__2__site_event */
#include "stacks.bpf.h"

/* Outstanding blocks by process and address: buckets of NATRACE_BUCKET_SLOTS in an array
 * (natrace.h), each slot claimed and emptied by compare-and-swap on its key word. A
 * BPF hash costs a block's malloc/free pair ~650 ns (the bucket and the element each a
 * cache miss, a bucket lock, the freelist); a bucket is one line of keys and the
 * block's own line. The blocks of a full bucket go to the `allocs` hash (spills:
 * how many it holds, so that no other call looks there while it is empty). */
#define BUCKETS (1 << BUCKET_BITS)
BPF_F_TABLE("array", u32, struct alloc_bucket, blocks, BUCKETS, BPF_F_MMAPABLE);
BPF_F_TABLE("hash", struct alloc_key, struct alloc_info, allocs, MAX_SPILLS,
            BPF_F_NO_PREALLOC);
BPF_ARRAY(spills, u64, 1);
/* Allocated on insert: per-CPU values cost (CPUs x 64 B) per site, only for sites seen. */
BPF_F_TABLE("percpu_hash", struct site_key, struct site_stats, sites, MAX_STACKS + 16,
            BPF_F_NO_PREALLOC);
/* Each thread's allocator-call state, in the thread's own task storage: found through
 * the task itself (no hash, no key), one allocation per thread apart from every other
 * thread's (no cache line two threads write), gone with the thread. */
BPF_TASK_STORAGE(entries, struct entry_state);
BPF_PERCPU_ARRAY(counters, u64, NATRACE_NCOUNTERS);
/* Processes and threads the traced processes forked, by pid (threads dropped at exit). */
BPF_TABLE("lru_hash", u32, struct natrace_fork, forks, 4096);
BPF_ARRAY(follow_children, u32, 1);   /* 1: trace the processes a traced one forks */

struct syscall_args {
    u64 a0, a1, a2, a3;
    u64 caller;     /* return address into the syscall wrapper's caller */
    u32 flags;
};
BPF_HASH(pending, u32, struct syscall_args, 16384);
/* triage.bpf.c's raw_syscalls programs when it traces too (tracer/probes/base.py puts
 * them here instead of attaching them): alloc's sys_enter/sys_exit tail-call them last.
 * An empty slot (no triage) makes the call a no-op. */
BPF_PROG_ARRAY(sys_next, 2);
#define SYS_NEXT_ENTER 0
#define SYS_NEXT_EXIT 1

/* The current thread's state, or NULL if it has none (`create`: made, zeroed). */
static __always_inline struct entry_state *thread_state(int create) {
    return entries.task_storage_get(bpf_get_current_task_btf(), 0,
                                    create ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);
}

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

/* The bucket of block `addr` of process `tgid` and its key word there (natrace.h); 0
 * when the key does not fit a word (an address at or above 2^48, a tgid of 23 bits or
 * more): the block goes to the spill hash. A bucket is a 128-byte range of addresses
 * (4 of glibc's smallest chunks, 8 of 16 bytes); the ranges of one 2^BUCKET_BITS-bucket
 * stretch of the address space take consecutive buckets from a start hashed from the
 * stretch and the process, so neighbouring blocks share table pages. */
static __always_inline int block_slot(u32 tgid, u64 addr, u32 *bucket, u64 *word) {
    if ((addr >> 48) || (tgid >> NATRACE_SLOT_TGID_BITS))
        return 0;
    u64 high = addr >> (7 + BUCKET_BITS);
    u64 start = (((high << NATRACE_SLOT_TGID_BITS) | tgid) * 0x9E3779B97F4A7C15ULL) >>
                (64 - BUCKET_BITS);
    *bucket = (u32)(((addr >> 7) + start) & (BUCKETS - 1));
    *word = (high << (NATRACE_SLOT_TGID_SHIFT + NATRACE_SLOT_TGID_BITS)) |
            ((u64)tgid << NATRACE_SLOT_TGID_SHIFT) | (addr & 127);
    return 1;
}

static __always_inline int spilled(void) {
    int zero = 0;
    u64 *n = spills.lookup(&zero);
    return n && *n;
}

static __always_inline void count_spill(s64 n) {
    int zero = 0;
    u64 *c = spills.lookup(&zero);
    if (c)
        __sync_fetch_and_add(c, n);
}

/* The first slot of bucket `bk` whose key word is `w` (with 0: its first empty slot),
 * or -1. */
static __always_inline int bucket_slot(const struct alloc_bucket *bk, u64 w) {
    int at = -1;
#pragma unroll
    for (int i = NATRACE_BUCKET_SLOTS - 1; i >= 0; i--) {
        if (bk->key[i] == w)
            at = i;
    }
    return at;
}

/* Take block (tgid, addr) out of the table into *info: 1 if it was there (0 also when
 * another path took it first). */
static __always_inline int take_block(u32 tgid, u64 addr, struct alloc_info *info) {
    u32 b;
    u64 w;
    if (block_slot(tgid, addr, &b, &w)) {
        struct alloc_bucket *bk = blocks.lookup(&b);
        if (!bk)
            return 0;
        int i = bucket_slot(bk, w);
        if (i >= 0) {
            i &= NATRACE_BUCKET_SLOTS - 1;
            *info = bk->info[i];
            return __sync_val_compare_and_swap(&bk->key[i], w, 0) == w;
        }
    }
    if (!spilled())
        return 0;
    struct alloc_key key = {.addr = addr, .tgid = tgid};
    struct alloc_info *found = allocs.lookup(&key);
    if (!found)
        return 0;
    *info = *found;
    if (allocs.delete(&key) != 0)
        return 0;
    count_spill(-1);
    return 1;
}

/* Put block (tgid, addr) in the table: 0, -EEXIST when it is there already, or the
 * spill hash's error when the hash is full too. A slot is claimed as BUSY, written,
 * then given its key (Python skips BUSY slots); a full bucket, or a slot another CPU
 * claimed first, sends the block to the spill hash. */
static __always_inline int put_block(u32 tgid, u64 addr, const struct alloc_info *info) {
    struct alloc_key key = {.addr = addr, .tgid = tgid};
    if (spilled() && allocs.lookup(&key))
        return -EEXIST;
    u32 b;
    u64 w;
    if (block_slot(tgid, addr, &b, &w)) {
        struct alloc_bucket *bk = blocks.lookup(&b);
        if (!bk)
            return -ENOENT;
        if (bucket_slot(bk, w) >= 0)
            return -EEXIST;
        int i = bucket_slot(bk, 0);
        if (i >= 0) {
            i &= NATRACE_BUCKET_SLOTS - 1;
            if (__sync_val_compare_and_swap(&bk->key[i], 0, NATRACE_SLOT_BUSY) == 0) {
                bk->info[i] = *info;
                /* the key after the info: x86-64 keeps stores in order (natrace is
                 * x86-64 only), so a compiler barrier is enough (an xchg: ~20 ns) */
                asm volatile("" ::: "memory");
                *(volatile u64 *)&bk->key[i] = w;
                return 0;
            }
        }
    }
    int err = allocs.insert(&key, info);
    if (err == 0)
        count_spill(1);
    return err;
}

/* `st`: the releasing thread's entry state (NULL if it has none), or, with `find_st`,
 * found here once the block is (a free of a block natrace never saw, allocated before
 * it attached, pays no task-storage lookup): freeing the block the thread recorded
 * last makes that block a temporary allocation. */
static __always_inline void release(u32 tgid, u64 addr, struct entry_state *st,
                                    int find_st) {
    struct alloc_info info;
    if (!take_block(tgid, addr, &info))
        return;
    if (find_st)
        st = thread_state(0);
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

/* The block of a capture whose stack is taken: recorded under its stack's site. */
static __always_inline void record_block(struct stack_capture *cap) {
    u64 addr = cap->ev.addr, size = cap->ev.size;
    struct alloc_info info = {};
    info.size = size;
    info.ts_ns = cap->ev.ts_ns;
    info.stack_id = cap->stack_id;
    count_stack_error(info.stack_id);
    info.weight = cap->ev.weight;

    u32 tgid = bpf_get_current_pid_tgid() >> 32;   /* run by the allocating task */
    struct site_key sk = {.stack_id = info.stack_id, .tgid = tgid};
    struct site_stats *s = sites.lookup(&sk);
    if (!s) {
        struct site_stats zero = {.first_ns = info.ts_ns};
        sites.insert(&sk, &zero);
        s = sites.lookup(&sk);
        if (!s) {
            count(NATRACE_CNT_SITES_FULL, 1);
            count(NATRACE_CNT_UNTRACKED_BYTES, size);
            return;
        }
    }
    /* Insert-if-absent spares a lookup on every allocation; an address already
     * there was released by a path we don't see: drop the old record first. */
    int err = put_block(tgid, addr, &info);
    if (err == -EEXIST) {
        release(tgid, addr, NULL, 0);
        count(NATRACE_CNT_STALE, 1);
        err = put_block(tgid, addr, &info);
    }
    if (err != 0) {
        count(NATRACE_CNT_UNTRACKED, 1);
        count(NATRACE_CNT_UNTRACKED_BYTES, size);
        return;
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
}

/* `weight`: the process's own estimate (USDT_SAMPLED), else unused; `unwind`: the
 * process's unwind slot. The block is recorded once its stack is taken: here if the
 * stack-id cache has it, else by record_block's continuation after the walk
 * (stacks.bpf.h). */
static __always_inline void record(struct pt_regs *ctx, u64 addr, u64 size, u64 caller,
                                   u64 weight, u32 unwind) {
    count(NATRACE_CNT_ALLOC_CALLS, 1);
#if SAMPLE_BYTES > 0
    if (size < SAMPLE_BYTES && (bpf_get_prandom_u32() % SAMPLE_BYTES) >= size) {
        count(NATRACE_CNT_SAMPLED_OUT, 1);
        return;
    }
#endif
    struct stack_capture *cap = capture_begin(CONT_RECORD, caller, unwind);
    if (cap) {
        cap->ev.addr = addr;
        cap->ev.size = size;
        cap->ev.ts_ns = bpf_ktime_get_ns();
        cap->ev.weight = weight;
        if (capture_cached(cap, ctx)) {
            record_block(cap);
            return;
        }
        tail_kp.call(ctx, STACK_WALK);
        stack_drop();
    }
    count(NATRACE_CNT_UNTRACKED, 1);
    count(NATRACE_CNT_UNTRACKED_BYTES, size);
}

int tail_kp__1__record_block(struct pt_regs *ctx) {
    struct stack_capture *cap = capture_resume();
    if (cap)
        record_block(cap);
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
    struct natrace_proc *p = armed_proc();
    if (p && ptr && weight)
        record(ctx, ptr, size, 0, weight, p->unwind);
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

/* The state of the current thread if its process is armed, else NULL. While the
 * targets' generation has not moved since the thread saw its process armed, that still
 * holds, and so does the process's unwind slot kept beside it (Python moves the
 * generation when it gives a process another slot): the `targets` lookup is spared
 * (the thread state is found without a hash). */
static __always_inline struct entry_state *armed_thread(void) {
    u64 gen = targets_generation();
    struct entry_state *st = thread_state(0);
    if (st && st->armed_gen == gen)
        return st;
    struct natrace_proc *p = armed_proc();
    if (!p)
        return NULL;
    if (!st)
        st = thread_state(1);
    if (st) {
        st->armed_gen = gen;   /* read before the lookup: a change since moves it on */
        st->unwind = p->unwind;
    }
    return st;
}

/* Entry: only the outermost allocator call of a thread is recorded; a call found
 * nested in one that is gone starts afresh (the lost one is counted). */
static __always_inline int enter(struct pt_regs *ctx, u32 kind, u64 size, u64 ptr) {
    struct entry_state *st = armed_thread();
    if (!st)
        return 0;
    u64 sp = PT_REGS_SP(ctx);
    if (st->depth > 0) {
        struct natrace_proc *p = armed_proc();
        if (!p)
            return 0;
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
    struct entry_state *st = armed_thread();
    if (!st)
        return 0;
    u64 sp = PT_REGS_SP(ctx), ret = 0;
    if (bpf_probe_read_user(&ret, sizeof(ret), (void *)sp) != 0)
        return 0;
    if (st->depth > 0) {
        struct natrace_proc *p = armed_proc();
        if (!p || outer_live(p, st, sp))
            return 0;
    }
    if (wrapper_live(st, sp))
        return 0;
    st->wrap_sp = sp;
    st->wrap_caller = ret;
    return 0;
}

/* Return: frame 0 of the stack taken here is the allocator's real caller (a wrapper's
 * caller is spliced in after it). */
int alloc_return(struct pt_regs *ctx) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct entry_state *st = thread_state(0);
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
                release(tgid, ptr, st, 0);
            block = ret;
        } else if (size == 0 && ptr) {
            release(tgid, ptr, st, 0);   /* realloc(p, 0) freed p */
        }
        break;
    default:
        block = ret;
    }
    if (block) {
        st->last = block;   /* a free of it before it is recorded finds nothing */
        record(ctx, block, size, caller, 0, st->unwind);
    }
    return 0;
}

/* Every process (and thread) a traced process forks is kept, so a report names those
 * natrace does not trace. */
#ifdef KOFF_TASK_PID
RAW_TRACEPOINT_PROBE(sched_process_fork) {   /* (parent, child): task_structs */
#else
TRACEPOINT_PROBE(sched, sched_process_fork) {   /* no BTF: a perf-event tracepoint */
#endif
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct natrace_proc *p = target_proc(pid_tgid);
    if (!p || !p->armed)
        return 0;
#ifdef KOFF_TASK_PID
    u32 child = 0;
    bpf_probe_read_kernel(&child, sizeof(child), (void *)ctx->args[1] + KOFF_TASK_PID);
#else
    u32 child = args->child_pid;
#endif
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
    /* its mappings are its parent's: so is its unwind table, until natrace gives it
     * its own slot at this stop */
    struct natrace_proc child = {.armed = 1, .stop = NATRACE_STOP_FORK, .parent = f->parent,
                                .follow = 1, .unwind = parent->unwind};
    if (targets.insert(&tgid, &child) != 0)
        return 0;   /* no room: named in the report as not traced */
    f->traced = 1;
    bpf_send_signal(19 /* SIGSTOP */);
    wake_natrace();
    return 0;
}

/* A thread that ends inside an allocator call (killed, pthread_exit from a signal
 * handler): counted (its state is freed with the task). */
RAW_TRACEPOINT_PROBE(sched_process_exit) {
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
    struct entry_state *st = thread_state(0);
    if (st && st->depth > 0)
        count(NATRACE_CNT_UNRETURNED, 1);   /* the state goes with the thread */
    return 0;
}

int free_enter(struct pt_regs *ctx) {
    u64 ptr = PT_REGS_PARM1(ctx);
    if (!ptr)
        return 0;
    release(bpf_get_current_pid_tgid() >> 32, ptr, NULL, 1);
    return 0;
}

/* ---- anonymous mappings ------------------------------------------------ */

#define MAP_ANONYMOUS_FLAG 0x20
#define MAP_FIXED_FLAG 0x10
#define PROT_EXEC_FLAG 0x4

/* A memory syscall's arguments (a0-a3: its first four, in the syscall's registers)
 * as its event needs them. */
static __always_inline void mem_args(struct syscall_args *a, long nr, u64 a0, u64 a1,
                                     u64 a2, u64 a3) {
    a->a0 = a0;
    switch (nr) {
    case NR_MMAP:   /* (addr, len, prot, flags, fd, off) */
        a->a1 = a1;
        a->a2 = a2;
        a->a3 = a3;
        a->flags = (a3 & MAP_ANONYMOUS_FLAG) ? NATRACE_EVF_ANON : 0;
        if (a2 & PROT_EXEC_FLAG)
            a->flags |= NATRACE_EVF_EXEC;
        if (!a2)
            a->flags |= NATRACE_EVF_NOACCESS;
        if (a3 & MAP_FIXED_FLAG)
            a->flags |= NATRACE_EVF_FIXED;
        break;
    case NR_MUNMAP:   /* (addr, len) */
        a->a1 = a1;
        break;
    case NR_MPROTECT:   /* (addr, len, prot) */
        a->a1 = a1;
        if (!a2)
            a->flags = NATRACE_EVF_NOACCESS;
        break;
    case NR_MREMAP:   /* (addr, old_len, new_len, flags, new_addr) */
        a->a1 = a1;
        a->a2 = a2;
        a->a3 = a3;
        break;
    }   /* brk: (addr) */
}

/* What the thread adds to a syscall's event: inside an allocator call or not, and *sp,
 * the wrapper's caller (see user_sp). */
static __always_inline void mem_context(struct syscall_args *a, u64 sp) {
    struct entry_state *st = thread_state(0);
    if (st && st->depth > 0)
        a->flags |= NATRACE_EVF_ALLOCATOR;
    bpf_probe_read_user(&a->caller, sizeof(a->caller), (void *)sp);
}

static __always_inline int syscall_enter(long nr, u64 a0, u64 a1, u64 a2, u64 a3) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct natrace_proc *p = target_proc(pid_tgid);
    if (!p || !p->armed)
        return 0;
    u32 tid = (u32)pid_tgid;
    struct syscall_args args = {};
    mem_args(&args, nr, a0, a1, a2, a3);
    mem_context(&args, user_sp());
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

/* A followed child mapped code: it stops (before running any of it) until natrace has
 * put that code's rows in its unwind table (tracer/engine/session.py), as a launched
 * target does (target.bpf.h). Not while another stop is pending, nor once natrace is
 * detaching (it turns follow_children off first). */
static __always_inline void stop_child_for_unwind_rows(struct natrace_proc *p) {
#ifdef UNWIND_CFI
    int zero = 0;
    u32 *on = follow_children.lookup(&zero);
    if (!on || !*on || p->stop)
        return;
    p->stop = NATRACE_STOP_CODE;
    bpf_send_signal(19 /* SIGSTOP */);
    wake_natrace();
#endif
}

/* The event of a memory syscall that returned `ret`, with the stack of the thread at
 * its return (mmap and brk): from raw_syscalls' sys_exit, or (`site`) from a uprobe
 * just past the syscall instruction in libc's or the loader's wrapper, where the
 * registers are the syscall's own. */
static __always_inline int mem_event(void *ctx, struct natrace_proc *p, u32 kind, long ret,
                                     const struct syscall_args *a, const int site) {
    if (ret < 0 && ret > -4096)
        return 0;   /* failed calls change no mapping */
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct mem_event e = {};
    e.ts_ns = bpf_ktime_get_ns();
    e.kind = kind;
    e.flags = a->flags;
    e.tid = (u32)pid_tgid;
    e.tgid = pid_tgid >> 32;
    e.caller = a->caller;
    int stack = 0;
    switch (kind) {
    case NATRACE_EV_MMAP:
        e.addr = ret;
        e.len = a->a1;
        stack = a->flags & NATRACE_EVF_ANON;
        if ((a->flags & NATRACE_EVF_EXEC) && !(a->flags & NATRACE_EVF_ANON)) {
            if (!p->parent)
                stop_for_unwind_rows();   /* the launched process's new code */
            else
                stop_child_for_unwind_rows(p);
        }
        break;
    case NATRACE_EV_MUNMAP:
    case NATRACE_EV_MPROTECT:
        e.addr = a->a0;
        e.len = a->a1;
        break;
    case NATRACE_EV_MREMAP:
        e.addr = a->a0;
        e.len = a->a1;
        e.new_len = a->a2;
        e.new_addr = ret;
        break;
    case NATRACE_EV_BRK:
        e.addr = ret;
        stack = 1;
        break;
    }
    if (stack) {
        struct stack_capture *cap = capture_begin(site ? CONT_SITE_EVENT : CONT_MEM_EVENT, 0,
                                                  p->unwind);
        if (cap) {
            cap->ev.mem = e;
            if (site)
                tail_kp.call(ctx, STACK_WALK);
            else
                tail_tp.call(ctx, STACK_WALK);
            stack_drop();
        }
        e.stack_id = -ENOEXEC;   /* no walk program: natrace is detaching */
        count_stack_error(e.stack_id);
    }
    emit_mem_event(&e);
    return 0;
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
    return mem_event(ctx, p, kind, ret, &a, 0);
}

/* A captured event's stack is taken: the event goes out. */
static __always_inline void emit_captured(struct stack_capture *cap) {
    struct mem_event e = cap->ev.mem;
    e.stack_id = cap->stack_id;
    count_stack_error(e.stack_id);
    emit_mem_event(&e);
}

/* An mmap or brk event once its stack is taken; then the next unit's sys_exit. */
int tail_tp__1__mem_event(void *ctx) {
    struct stack_capture *cap = capture_resume();
    if (cap)
        emit_captured(cap);
    sys_next.call(ctx, SYS_NEXT_EXIT);
    return 0;
}

int tail_kp__2__site_event(struct pt_regs *ctx) {
    struct stack_capture *cap = capture_resume();
    if (cap)
        emit_captured(cap);
    return 0;
}

/* The memory syscalls without raw_syscalls (tracer/probes/syscallsites.py): a uprobe
 * just after each `mov $NR, %eax; syscall` of libc's and the loader's wrappers (mmap,
 * munmap, mremap, mprotect, brk: sbrk, malloc and pthread_create call the same ones), on the conditional jump
 * that tests the result where one follows (emulated, not single-stepped), where rax
 * holds what the syscall returned and every argument register used still holds its
 * argument. Then no syscall of the process takes the kernel's traced-syscall path: not
 * its futex calls, nor the uretprobe syscall every traced malloc returns through. */
static __always_inline int syscall_site(struct pt_regs *ctx, long nr, u32 kind) {
    struct natrace_proc *p = armed_proc();
    if (!p)
        return 0;
    struct syscall_args a = {};
    mem_args(&a, nr, ctx->di, ctx->si, ctx->dx, ctx->r10);
    mem_context(&a, PT_REGS_SP(ctx));
    a.flags |= NATRACE_EVF_SITE;   /* frame 0 is the probe's pc: put back by Python */
    return mem_event(ctx, p, kind, (long)PT_REGS_RC(ctx), &a, 1);
}

int site_mmap(struct pt_regs *ctx) {
    return syscall_site(ctx, NR_MMAP, NATRACE_EV_MMAP);
}

int site_munmap(struct pt_regs *ctx) {
    return syscall_site(ctx, NR_MUNMAP, NATRACE_EV_MUNMAP);
}

int site_mremap(struct pt_regs *ctx) {
    return syscall_site(ctx, NR_MREMAP, NATRACE_EV_MREMAP);
}

int site_brk(struct pt_regs *ctx) {
    return syscall_site(ctx, NR_BRK, NATRACE_EV_BRK);
}

int site_mprotect(struct pt_regs *ctx) {
    return syscall_site(ctx, NR_MPROTECT, NATRACE_EV_MPROTECT);
}

/* raw_syscalls, dispatched by number (target.bpf.h): the memory syscalls and a forked
 * child's first return. These run for every syscall of every process: a syscall no
 * natrace unit traces returns at once, and when triage.bpf.c traces too its programs
 * are not attached but tail-called from here (sys_next), so a syscall costs the
 * machine one natrace program per direction, not two. */
static __always_inline int alloc_sys_enter(struct bpf_raw_tracepoint_args *ctx, long nr) {
    if (nr != NR_MMAP && nr != NR_MUNMAP && nr != NR_MREMAP && nr != NR_BRK &&
        nr != NR_MPROTECT)
        return 0;
    struct pt_regs *regs = syscall_regs(ctx);
    u64 a0 = syscall_arg(regs, 0);
    if (nr == NR_BRK)
        return syscall_enter(nr, a0, 0, 0, 0);
    u64 a1 = syscall_arg(regs, 1);
    if (nr == NR_MUNMAP)
        return syscall_enter(nr, a0, a1, 0, 0);
    return syscall_enter(nr, a0, a1, syscall_arg(regs, 2), syscall_arg(regs, 3));
}

RAW_TRACEPOINT_PROBE(sys_enter) {
    long nr = ctx->args[1];
    if (!natrace_syscall(nr))
        return 0;
    alloc_sys_enter(ctx, nr);
    sys_next.call(ctx, SYS_NEXT_ENTER);
    return 0;
}

/* An event with a stack tail-calls the walk: its continuation (tail_tp__1__mem_event)
 * calls the next unit's sys_exit then. */
RAW_TRACEPOINT_PROBE(sys_exit) {
    long nr = syscall_exit_nr();
    if (!natrace_syscall(nr))
        return 0;
    long ret = (long)ctx->args[1];
    switch (nr) {
    case NR_CLONE:
    case NR_CLONE3:
    case NR_FORK:
    case NR_VFORK:
        born(ret);
        break;
    case NR_MMAP:
        syscall_exit(ctx, NATRACE_EV_MMAP, ret);
        break;
    case NR_MUNMAP:
        syscall_exit(ctx, NATRACE_EV_MUNMAP, ret);
        break;
    case NR_MREMAP:
        syscall_exit(ctx, NATRACE_EV_MREMAP, ret);
        break;
    case NR_BRK:
        syscall_exit(ctx, NATRACE_EV_BRK, ret);
        break;
    case NR_MPROTECT:
        syscall_exit(ctx, NATRACE_EV_MPROTECT, ret);
        break;
    }
    sys_next.call(ctx, SYS_NEXT_EXIT);
    return 0;
}
