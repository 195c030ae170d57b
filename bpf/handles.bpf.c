/* Handle lifecycles: create/destroy function pairs (PQmakeEmptyPGresult/PQclear,
 * napi_create_reference/napi_delete_reference, any user pair) through uprobes.
 *
 * Aggregated here like allocations in alloc.bpf.c: live handles by (address, pair)
 * and atomic per-pair and per-(pair, stack) counters, so a snapshot taken while the
 * program churns is exact. A handle is counted once however many create functions
 * of its pair return it (PQconnectdb returns what PQconnectStart made inside it).
 *
 * Each pair n has three stubs (create_enter_n, create_return_n, destroy_n); how it
 * passes its handle is in conf[n], written by tracer/probes/handles.py.
 *
 * Compile-time parameters: WAIT_EXEC (see target.bpf.h), PAIR_SLOTS (pairs n < it
 * have stubs), MAX_HANDLES, MAX_STACKS (see stacks.bpf.h).
 */
#include <uapi/linux/ptrace.h>
#include "natrace.h"
#include "target.bpf.h"

/* What the continuation of a stack capture (stacks.bpf.h) needs of its handle. */
struct capture_event {
    struct handle_key key;
    struct handle_info info;
};
#define STACKS_KP 1       /* every event comes from a uprobe: tail_kp */
#define CONT_CREATED 1    /* tail_kp__1__created */
#include "stacks.bpf.h"

struct entry_key {
    u32 tid;
    u32 pair;
};

BPF_ARRAY(conf, struct handle_conf, NATRACE_MAX_PAIRS);
BPF_ARRAY(pair_stats, struct handle_pair_stats, NATRACE_MAX_PAIRS);
/* Allocated on insert: a big limit costs nothing until handles live. */
BPF_F_TABLE("hash", struct handle_key, struct handle_info, handles, MAX_HANDLES,
            BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct handle_site_key, struct handle_site_stats, sites, MAX_STACKS + 16,
            BPF_F_NO_PREALLOC);
BPF_TABLE("lru_hash", struct entry_key, struct handle_entry, entries, 16384);

/* Argument n (1-based) of a probed call. All six are read first and pinned in
 * registers: a switch of ctx loads gets merged into one load at a computed ctx
 * offset, which the verifier refuses. */
#define PIN(v) asm volatile("" : "+r"(v))
static __always_inline u64 arg(struct pt_regs *ctx, u32 n) {
    u64 a1 = PT_REGS_PARM1(ctx), a2 = PT_REGS_PARM2(ctx), a3 = PT_REGS_PARM3(ctx);
    u64 a4 = PT_REGS_PARM4(ctx), a5 = PT_REGS_PARM5(ctx), a6 = PT_REGS_PARM6(ctx);
    PIN(a1); PIN(a2); PIN(a3); PIN(a4); PIN(a5); PIN(a6);
    switch (n) {
    case 1: return a1;
    case 2: return a2;
    case 3: return a3;
    case 4: return a4;
    case 5: return a5;
    case 6: return a6;
    }
    return 0;
}

/* Forget a live handle; 0 if it was not tracked. */
static __always_inline int forget(struct handle_key *key, struct handle_pair_stats *ps) {
    struct handle_info *found = handles.lookup(key);
    if (!found)
        return 0;
    struct handle_site_key sk = {.pair = key->pair, .stack_id = found->stack_id};
    if (handles.delete(key) != 0)
        return 0;   /* another thread destroyed it first */
    struct handle_site_stats *s = sites.lookup(&sk);
    if (s)
        __sync_fetch_and_add(&s->live, -1);
    __sync_fetch_and_add(&ps->live, -1);
    return 1;
}

static __always_inline int create_enter(struct pt_regs *ctx, u32 pair) {
    if (!is_armed())
        return 0;
    struct handle_conf *c = conf.lookup(&pair);
    if (!c)
        return 0;
    struct entry_key ek = {.tid = (u32)bpf_get_current_pid_tgid(), .pair = pair};
    struct handle_entry *st = entries.lookup(&ek);
    if (!st) {
        struct handle_entry fresh = {};
        entries.update(&ek, &fresh);
        st = entries.lookup(&ek);
        if (!st)
            return 0;
    }
    u32 d = st->depth;
    if (d == 0)
        st->outer_ts = bpf_ktime_get_ns();
    if (d < NATRACE_HANDLE_NEST)
        st->out[d] = c->out_arg ? arg(ctx, c->out_arg) : 0;
    st->depth = d + 1;
    return 0;
}

static __always_inline int create_return(struct pt_regs *ctx, u32 pair) {
    struct entry_key ek = {.tid = (u32)bpf_get_current_pid_tgid(), .pair = pair};
    struct handle_entry *st = entries.lookup(&ek);
    if (!st || st->depth == 0)
        return 0;   /* the call began before natrace attached */
    u32 d = --st->depth;
    u64 outer_ts = st->outer_ts;
    u64 out = 0;
    if (d < NATRACE_HANDLE_NEST)
        out = st->out[d];
    struct handle_conf *c = conf.lookup(&pair);
    struct handle_pair_stats *ps = pair_stats.lookup(&pair);
    if (!c || !ps)
        return 0;
    u64 ret = PT_REGS_RC(ctx);
    u64 handle = ret;
    if (c->out_arg) {
        handle = 0;
        if (ret != 0 || !out || bpf_probe_read_user(&handle, sizeof(handle), (void *)out) != 0)
            return 0;
    }
    if (!handle)
        return 0;

    struct handle_key key = {.addr = handle, .pair = pair};
    u32 tid = ek.tid;
    struct handle_info *have = handles.lookup(&key);
    if (have) {
        if (have->tid == tid && have->ts_ns >= outer_ts)
            return 0;   /* made by a nested create inside this call: already counted */
        forget(&key, ps);   /* its destroy went through a path natrace does not see */
        __sync_fetch_and_add(&ps->stale, 1);
    }
    struct stack_capture *cap = capture_begin(CONT_CREATED, 0, unwind_slot());
    if (!cap) {
        __sync_fetch_and_add(&ps->untracked, 1);
        return 0;
    }
    cap->ev.key = key;
    struct handle_info info = {.ts_ns = bpf_ktime_get_ns(), .tid = tid};
    cap->ev.info = info;
    tail_kp.call(ctx, STACK_WALK);
    stack_drop();
    __sync_fetch_and_add(&ps->untracked, 1);
    return 0;
}

/* A created handle once its stack is taken. */
int tail_kp__1__created(struct pt_regs *ctx) {
    struct stack_capture *cap = capture_resume();
    if (!cap)
        return 0;
    struct handle_key key = cap->ev.key;
    struct handle_info info = cap->ev.info;
    info.stack_id = cap->stack_id;  /* -errno: its own bucket */
    u32 pair = key.pair;
    struct handle_pair_stats *ps = pair_stats.lookup(&pair);
    if (!ps)
        return 0;
    struct handle_site_key sk = {.pair = pair, .stack_id = info.stack_id};
    struct handle_site_stats *s = sites.lookup(&sk);
    if (!s) {
        struct handle_site_stats zero = {};
        sites.insert(&sk, &zero);
        s = sites.lookup(&sk);
    }
    if (!s || handles.update(&key, &info) != 0) {
        __sync_fetch_and_add(&ps->untracked, 1);
        return 0;
    }
    __sync_fetch_and_add(&s->live, 1);
    __sync_fetch_and_add(&s->created, 1);
    __sync_fetch_and_add(&ps->live, 1);
    __sync_fetch_and_add(&ps->created, 1);
    return 0;
}

static __always_inline int destroy(struct pt_regs *ctx, u32 pair) {
    if (!is_armed())
        return 0;
    struct handle_conf *c = conf.lookup(&pair);
    struct handle_pair_stats *ps = pair_stats.lookup(&pair);
    if (!c || !ps)
        return 0;
    struct handle_key key = {.addr = arg(ctx, c->destroy_arg), .pair = pair};
    if (!key.addr)
        return 0;   /* PQclear(NULL) and the like */
    if (forget(&key, ps))
        __sync_fetch_and_add(&ps->destroyed, 1);
    else
        __sync_fetch_and_add(&ps->unknown, 1);
    return 0;
}

#define PAIR_PROBES(n)                                                                   \
    int create_enter_##n(struct pt_regs *ctx) { return create_enter(ctx, n); }          \
    int create_return_##n(struct pt_regs *ctx) { return create_return(ctx, n); }        \
    int destroy_##n(struct pt_regs *ctx) { return destroy(ctx, n); }

/* Only the slots a session can fill (PAIR_SLOTS, <= NATRACE_MAX_PAIRS) are compiled: each
 * costs LLVM ~0.02 s of a cold compile and is verified at every load. */
#if PAIR_SLOTS > 0
PAIR_PROBES(0)
#endif
#if PAIR_SLOTS > 1
PAIR_PROBES(1)
#endif
#if PAIR_SLOTS > 2
PAIR_PROBES(2)
#endif
#if PAIR_SLOTS > 3
PAIR_PROBES(3)
#endif
#if PAIR_SLOTS > 4
PAIR_PROBES(4)
#endif
#if PAIR_SLOTS > 5
PAIR_PROBES(5)
#endif
#if PAIR_SLOTS > 6
PAIR_PROBES(6)
#endif
#if PAIR_SLOTS > 7
PAIR_PROBES(7)
#endif
#if PAIR_SLOTS > 8
PAIR_PROBES(8)
#endif
#if PAIR_SLOTS > 9
PAIR_PROBES(9)
#endif
#if PAIR_SLOTS > 10
PAIR_PROBES(10)
#endif
#if PAIR_SLOTS > 11
PAIR_PROBES(11)
#endif
#if PAIR_SLOTS > 12
PAIR_PROBES(12)
#endif
#if PAIR_SLOTS > 13
PAIR_PROBES(13)
#endif
#if PAIR_SLOTS > 14
PAIR_PROBES(14)
#endif
#if PAIR_SLOTS > 15
PAIR_PROBES(15)
#endif
