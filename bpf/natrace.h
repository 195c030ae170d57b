/* Layouts shared by natrace's BPF programs and its Python side.
 *
 * The BPF C includes this file; Python reads the NATRACE_* #defines from it
 * (tracer/probes/bpfprog.py) and gets the struct layouts from bcc, which builds its
 * ctypes from these very declarations. Change a layout here and both sides follow.
 */
#ifndef NATRACE_H
#define NATRACE_H

/* User stacks (bpf/stacks.bpf.h): frames kept per stack, innermost first, zero-padded. */
#define NATRACE_STACK_DEPTH 127

struct natrace_stack {
    u64 ips[NATRACE_STACK_DEPTH];
    u32 end;        /* NATRACE_END_*: why the walk stopped (CFI walk only; 0 otherwise) */
    u32 pad;
};

/* ---- unwinding without frame pointers (bpf/stacks.bpf.h, tracer/probes/unwinding.py) ----
 *
 * One table per traced address space: rows sorted by runtime address, each saying how
 * to step from a frame at or above its address to the caller's, until the next row. An
 * object without frame pointers contributes its CFI rows (tracer/symbols/cfi.py),
 * one with frame pointers (or JIT code) a single FP row; each executable mapping ends
 * with a NO_MAPPING row. Every process's table is a segment of the one unwind_rows
 * array, handed out by Python; a process's unwind_conf slot (natrace_proc.unwind)
 * says where its segment is. A rewrite goes to a fresh segment, then the slot points
 * at it: a walk never reads a half-written table. A forked child's slot points at its
 * parent's segment until its mappings differ. The probe sets of one session share
 * the table (one program's maps). */
#define NATRACE_UNWIND_STEPS 19        /* binary-search steps over ... */
#define NATRACE_UNWIND_ROWS 524288     /* ... the rows of one process's segment at most:
                                          1 << NATRACE_UNWIND_STEPS (python3.11 with libpq
                                          and its TLS stack needs ~260k, libc 28k,
                                          libcrypto 86k) */
#define NATRACE_UNWIND_TABLE 1048576   /* rows of all segments: 2 x NATRACE_UNWIND_ROWS (16 MiB) */
#define NATRACE_UNWIND_SLOTS 1024      /* unwind_conf's entries: one per traced process
                                          (NATRACE_MAX_PROCS) */

/* How a row finds the canonical frame address (CFA); the return address is at CFA-8. */
#define NATRACE_CFA_NONE 0          /* no unwind information covers this address */
#define NATRACE_CFA_RSP 1           /* CFA = rsp + cfa_off */
#define NATRACE_CFA_RBP 2           /* CFA = rbp + cfa_off */
#define NATRACE_CFA_END 3           /* return address undefined: the outermost frame */
#define NATRACE_CFA_UNSUPPORTED 4   /* a DWARF expression: the walk stops */
#define NATRACE_CFA_FP 5            /* code with frame pointers: [rbp] caller's rbp, [rbp+8] return */
#define NATRACE_CFA_NO_MAPPING 6    /* outside the target's executable mappings */
/* How a row finds the caller's rbp. */
#define NATRACE_RBP_SAME 0          /* unchanged */
#define NATRACE_RBP_SAVED 1         /* saved at CFA + rbp_off */
#define NATRACE_RBP_LOST 2          /* in another register or an expression: unknown */

struct unwind_row {
    u64 pc;         /* runtime address where the row begins */
    s32 cfa_off;
    s16 rbp_off;
    u8 cfa;         /* NATRACE_CFA_* */
    u8 rbp;         /* NATRACE_RBP_* */
};

struct unwind_conf {
    u32 base;       /* the process's segment starts at this index of unwind_rows */
    u32 count;      /* its rows (0: none, frame pointers) */
    u32 gen;        /* a new one for every segment written (one counter for all slots):
                       stacks.bpf.h's cache keeps walks per table */
    u32 pad;
};

/* Why a stack walk ended (natrace_stack.end; per-capture counters in unwind_ends). */
#define NATRACE_END_OUTERMOST 0     /* the first frame of the thread was reached */
#define NATRACE_END_DEPTH 1         /* UNWIND_DEPTH frames taken (stacks.bpf.h) */
#define NATRACE_END_NO_MAPPING 2    /* outside the table's mappings, and frame pointers failed */
#define NATRACE_END_NO_ROW 3        /* no unwind row covers the address (an object's gap) */
#define NATRACE_END_UNSUPPORTED 4   /* a rule the walk does not follow (DWARF expression) */
#define NATRACE_END_READ 5          /* the stack could not be read there */
#define NATRACE_END_BAD_FRAME 6     /* a frame pointer or CFA below the stack pointer */
#define NATRACE_END_DROPPED 7       /* no walk: the event was lost (stacks.bpf.h, stack_drop) */
#define NATRACE_END_COUNT 8

/* Allocator entry points, as the `kind` of a probe. */
#define NATRACE_FN_MALLOC 1          /* (size) -- also valloc; pvalloc rounded up to pages */
#define NATRACE_FN_CALLOC 2          /* (n, size) */
#define NATRACE_FN_REALLOC 3         /* (ptr, size) */
#define NATRACE_FN_REALLOCARRAY 4    /* (ptr, n, size) */
#define NATRACE_FN_MEMALIGN 5        /* (align, size) -- also aligned_alloc */
#define NATRACE_FN_POSIX_MEMALIGN 6  /* (void **out, align, size) */
#define NATRACE_FN_FAILED 8          /* a size that overflows (calloc, reallocarray,
                                        pvalloc): the call fails and changes nothing */

/* Blocks are counted in 1/65536ths so that sampled estimates (1/p blocks per
 * sampled allocation) stay exact integers in unsampled mode. */
#define NATRACE_BLOCK_SHIFT 16

/* Per-CPU counters of what the pipeline could not record. */
#define NATRACE_CNT_STACK_EFAULT 0     /* stack walk faulted */
#define NATRACE_CNT_STACK_FULL 1       /* stack map full */
#define NATRACE_CNT_STACK_ENOMEM 2     /* no memory for a new stack */
#define NATRACE_CNT_STACK_OTHER 3
#define NATRACE_CNT_UNTRACKED 4        /* allocation not recorded: outstanding map full */
#define NATRACE_CNT_UNTRACKED_BYTES 5
#define NATRACE_CNT_SITES_FULL 6       /* allocation not recorded: site map full */
#define NATRACE_CNT_STALE 7            /* address reused without a traced free */
#define NATRACE_CNT_EVENTS_LOST 8      /* ring buffer full */
#define NATRACE_CNT_ALLOC_CALLS 9      /* outermost allocator calls seen */
#define NATRACE_CNT_FREE_CALLS 10      /* free() of a tracked block */
#define NATRACE_CNT_SAMPLED_OUT 11     /* allocations skipped by sampling */
#define NATRACE_CNT_UNRETURNED 12      /* allocator calls that never returned (longjmp, a
                                          thread gone mid-call): not recorded */
#define NATRACE_NCOUNTERS 13

/* Memory-mapping syscalls streamed to Python (range operations). */
#define NATRACE_EV_MMAP 1
#define NATRACE_EV_MUNMAP 2
#define NATRACE_EV_MREMAP 3
#define NATRACE_EV_BRK 4
#define NATRACE_EV_STOP 5   /* no mapping: a traced process stopped for natrace (a wake-up) */
#define NATRACE_EV_MPROTECT 6   /* no stack: the range keeps its owner */

/* mem_event.flags */
#define NATRACE_EVF_ALLOCATOR 1   /* made by the allocator itself (inside a malloc-family call) */
#define NATRACE_EVF_ANON 2        /* anonymous mapping */
#define NATRACE_EVF_EXEC 4        /* executable mapping: the process's module list changed */
#define NATRACE_EVF_SITE 8        /* seen at a syscall site's uprobe (its pc: syscallsites.py) */
#define NATRACE_EVF_NOACCESS 16   /* mmap/mprotect with PROT_NONE: address space, no memory */
#define NATRACE_EVF_FIXED 32      /* mmap with MAP_FIXED: over whatever was there */

/* Outstanding blocks and call sites are per address space: a forked child holds the
 * same addresses as its parent, an exec'd one different code at the same ones. */
struct alloc_key {
    u64 addr;
    u32 tgid;
    u32 pad;
};
struct site_key {
    s32 stack_id;   /* negative: -errno of the failed stack capture */
    u32 tgid;
};

/* Outstanding block, keyed by process and address. */
struct alloc_info {
    u64 size;
    u64 ts_ns;
    s32 stack_id;   /* negative: -errno of the failed stack capture */
    u32 pad;
    u64 weight;     /* sampled in the process: the probe's unbiased bytes estimate */
};

/* Outstanding blocks (bpf/alloc.bpf.c's `blocks`): an array of buckets, each the blocks
 * of one 128-byte range of addresses of one process (ranges spread over the buckets),
 * read by Python through mmap. The bucket's keys share one cache line; a key word is
 * 0 (empty), NATRACE_SLOT_BUSY (being written) or the block's tgid at
 * NATRACE_SLOT_TGID_SHIFT, the address's bits the bucket does not tell around it
 * (never 0 or BUSY: a tgid is never 0; they fit with 2^6 buckets or more). A block
 * whose bucket is full goes to the `allocs` hash. */
#define NATRACE_BUCKET_SLOTS 8
#define NATRACE_SLOT_BUSY 1
#define NATRACE_SLOT_TGID_SHIFT 7
#define NATRACE_SLOT_TGID_BITS 22
struct alloc_bucket {
    u64 key[NATRACE_BUCKET_SLOTS];
    struct alloc_info info[NATRACE_BUCKET_SLOTS];
};

/* Per call site (stack id), one copy per CPU (alloc.bpf.c's percpu_hash): a CPU
 * only adds to its own, so no atomics and no cache line shared between threads; a
 * block freed on another CPU than it was allocated on leaves one copy negative and
 * the sum, which Python takes, exact. bytes/blocks are outstanding; allocs/alloc_bytes
 * are totals since attach; temp_* count the temporary allocations among them (freed
 * by the allocating thread before that thread allocated again: heaptrack's sense).
 * In sampled mode all are unbiased estimates. first_ns/last_ns: the site's first and
 * latest allocation (Python takes the earliest nonzero copy and the latest). */
struct site_stats {
    s64 bytes;
    s64 blocks_fp;      /* blocks << NATRACE_BLOCK_SHIFT */
    u64 allocs_fp;      /* allocations << NATRACE_BLOCK_SHIFT */
    u64 alloc_bytes;
    u64 temp_fp;        /* temporary allocations << NATRACE_BLOCK_SHIFT */
    u64 temp_bytes;
    u64 first_ns;       /* bpf_ktime_get_ns(); set in the inserting CPU's copy */
    u64 last_ns;
#if defined(USDT_SAMPLED) || SAMPLE_BYTES > 0
    /* in-kernel sampling counts the blocks below the period: larger ones are exact */
    s64 samples;        /* sampled blocks outstanding (the estimates' sample size) */
    u64 alloc_samples;  /* sampled allocations since attach */
#endif
};

/* A thread inside an allocator call; depth survives nested calls (reallocarray ->
 * realloc, operator new -> malloc). A call that never returns (longjmp, a thread gone
 * mid-call) is found out by its stack slot: `sp` points at the outermost call's return
 * address, which the uretprobe replaced with its trampoline while the call lives.
 * Wrappers (strdup, operator new) get no uretprobe: an exception thrown through a
 * trampoline finds no unwind info and terminates the program. Their entry keeps the
 * return address into their caller, spliced into the stacks of the allocations made
 * inside them. */
struct entry_state {
    u64 size;
    u64 ptr;          /* realloc's old block, posix_memalign's out-pointer */
    u64 sp;           /* user sp at the outermost call's entry */
    u64 caller;       /* a live wrapper's return address when the outermost call began */
    u64 wrap_sp;      /* user sp at the outermost live wrapper's entry (0: none) */
    u64 wrap_caller;  /* ... and the return address found there */
    u64 last;         /* the thread's latest recorded block: freed before the next one is
                         recorded, it was a temporary allocation */
    u64 armed_gen;    /* the targets' generation at which its process was seen armed
                         (bpf/target.bpf.h's targets_generation; 0: not seen) */
    u32 depth;
    u16 kind;
    u16 unwind;       /* its process's unwind slot (natrace_proc.unwind), read with armed_gen */
};

/* A traced process (bpf/target.bpf.h's `targets`, by tgid). */
struct natrace_proc {
    u64 trampoline;   /* its uretprobe trampoline's address, once seen (alloc.bpf.c) */
    u32 execs;        /* exec()s since natrace traced it */
    u32 armed;        /* 1 while recording */
    u32 stop;         /* NATRACE_STOP_*: why it last stopped itself for natrace (0: none) */
    u32 parent;       /* the traced process that forked it; 0: the one natrace was given */
    u32 follow;       /* 1: it stops at exec for natrace to follow it; 0: an exec ends it */
    u32 unwind;       /* its slot in unwind_conf (bpf/stacks.bpf.h): 0 for the process
                         natrace was given; a forked child's starts as its parent's, and
                         tracer/probes/unwinding.py gives it its own at its fork stop */
};
#define NATRACE_MAX_PROCS 1024
#define NATRACE_STOP_FORK 1   /* a child just born, before its first instruction */
#define NATRACE_STOP_EXEC 2   /* exec'd another program, before its first instruction */
#define NATRACE_STOP_EXIT 3   /* in _Exit: its address space is still there */
#define NATRACE_STOP_CODE 4   /* a followed child mapped code: its unwind rows are loaded */

/* A process (or thread, dropped when it exits) the target forked: natrace follows one
 * process, and names those it does not trace, exited or not. */
struct natrace_fork {
    char comm[16];   /* at its exit: the program it exec'd */
    u32 exited;
    u32 parent;      /* the traced process that forked it */
    u32 traced;      /* 1: natrace traces it too (a process, children followed) */
    u32 pad;
};

/* mmap/munmap/mremap/mprotect/brk, after the call returned successfully. */
struct mem_event {
    u64 ts_ns;
    u64 addr;       /* mmap: result; munmap/mprotect: start; mremap: old address; brk: new break */
    u64 len;        /* mmap/munmap/mprotect: length; mremap: old length; brk: 0 */
    u64 new_addr;   /* mremap: new address */
    u64 new_len;    /* mremap: new length */
    u64 caller;     /* return address into the syscall wrapper's caller (0 if unread) */
    s32 stack_id;
    u32 kind;
    u32 flags;
    u32 tid;
    u32 tgid;       /* the process whose address space it changed */
    u32 pad;
};

/* ---- triage: futex waits, memory syscalls, page faults (bpf/triage.bpf.c) ---- */

/* Futex commands are the kernel's FUTEX_* numbers (op & 127); the futex2 syscalls,
 * which have no op, get these pseudo-commands. */
#define NATRACE_FUTEX2_WAIT 64
#define NATRACE_FUTEX2_WAKE 65
#define NATRACE_FUTEX2_WAITV 66
#define NATRACE_FUTEX2_REQUEUE 67
#define NATRACE_FUTEX_PRIVATE_FLAG 128

/* Wait times in a log2 histogram: slot i counts waits of [2^i, 2^(i+1)) ns. */
#define NATRACE_HIST_SLOTS 40

/* Memory syscalls, as the `sys` of a key. */
#define NATRACE_MS_MMAP 0
#define NATRACE_MS_MUNMAP 1
#define NATRACE_MS_MREMAP 2
#define NATRACE_MS_MPROTECT 3
#define NATRACE_MS_MADVISE 4
#define NATRACE_MS_BRK 5
#define NATRACE_MS_COUNT 6

/* Per-CPU counters of the triage program. */
#define NATRACE_TC_STACK_LOST 0      /* stack capture failed (the event kept its -errno bucket) */
#define NATRACE_TC_KEYS_FULL 1       /* an event not counted: aggregation map full */
#define NATRACE_TC_EXEC_MMAPS 2      /* executable mappings made: the module list changed */
#define NATRACE_TC_FAULTS 3          /* page faults seen (all, attributed or not) */
#define NATRACE_TC_COUNT 4

struct futex_key {
    u64 uaddr;      /* the lock word */
    s32 stack_id;   /* caller's stack; negative: -errno of a failed capture */
    u32 cmd;        /* FUTEX_* command or NATRACE_FUTEX2_* */
};

struct futex_stats {
    u64 calls;
    u64 private_calls;   /* FUTEX_PRIVATE_FLAG set */
    u64 wait_ns;         /* time inside the call (blocking commands: time blocked) */
    u64 max_ns;
    u64 woken;           /* sum of positive return values (wake/requeue: threads woken) */
    u64 err_eagain;
    u64 err_etimedout;
    u64 err_eintr;
    u64 err_other;
    u64 hist[NATRACE_HIST_SLOTS];
};

struct memsys_key {
    u32 sys;        /* NATRACE_MS_* */
    s32 stack_id;   /* NATRACE_NO_STACK in the per-syscall totals */
};
#define NATRACE_NO_STACK 0x7fffffff

struct memsys_stats {
    u64 calls;
    u64 errors;
    u64 ns;
    u64 bytes;      /* successful calls: length (mremap: new length; brk: |change|) */
};

struct memsys_err_key {
    u32 sys;
    u32 err;        /* errno */
};

/* ---- handle lifecycles: create/destroy pairs (bpf/handles.bpf.c) ---- */

/* Pairs traced at once (each gets its own create/return/destroy stubs). */
#define NATRACE_MAX_PAIRS 16
/* Nested create calls of one pair on one thread whose out-pointer is kept. */
#define NATRACE_HANDLE_NEST 4

/* How a pair's functions pass the handle, set by Python before attaching. */
struct handle_conf {
    u32 destroy_arg;   /* 1-based argument of the destroy function holding the handle */
    u32 out_arg;       /* 0: create returns the handle; else 1-based out-pointer argument
                          (the handle is read through it at return, when create returned 0) */
};

/* Per pair, atomic adds: exact however the program churns. */
struct handle_pair_stats {
    u64 created;       /* handles returned by outermost creates since attach */
    u64 destroyed;     /* destroys of a tracked handle */
    u64 unknown;       /* destroys of a handle natrace never saw created (before attach) */
    s64 live;
    u64 stale;         /* a create returned a live handle's address: its destroy was missed */
    u64 untracked;     /* handle not tracked: live map full */
};

/* A live handle, keyed by (address, pair). */
struct handle_key {
    u64 addr;
    u32 pair;
    u32 pad;
};

struct handle_info {
    u64 ts_ns;
    s32 stack_id;      /* negative: -errno of the failed stack capture */
    u32 tid;           /* creating thread: nested creates of the same handle count once */
};

/* Per (pair, creation stack). */
struct handle_site_key {
    u32 pair;
    s32 stack_id;
};

struct handle_site_stats {
    s64 live;
    u64 created;
};

/* A thread inside create calls of one pair. */
struct handle_entry {
    u64 outer_ts;      /* when the outermost call began */
    u64 out[NATRACE_HANDLE_NEST];
    u32 depth;
    u32 pad;
};

#endif
