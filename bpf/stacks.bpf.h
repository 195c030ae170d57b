/* Collision-free user stack ids.
 *
 * BPF_STACK_TRACE hashes a stack into one bucket and fails with -EEXIST when the
 * bucket holds another stack: on a busy Node.js process a 32k-entry map lost
 * stacks by the thousand. Here a stack is hashed (FNV-1a over its frames) into a
 * u64 that maps to a small sequential id; the frames are stored once under that
 * id in a map that allocates on insert, so a big limit costs nothing until used.
 * Ids stay s32 and negative values stay -errno, like bpf_get_stackid's.
 *
 * Compile-time parameters: MAX_STACKS; NCPUS (possible CPUs, set by tracer/probes/bpfprog.py).
 */
#ifndef NATRACE_STACKS_BPF_H
#define NATRACE_STACKS_BPF_H

BPF_HASH(stack_ids, u64, s32, MAX_STACKS);
BPF_F_TABLE("hash", s32, struct natrace_stack, stack_traces, MAX_STACKS, BPF_F_NO_PREALLOC);
BPF_PERCPU_ARRAY(stack_next, u32, 1);   /* ids handed out by this CPU */
BPF_PERCPU_ARRAY(stack_scratch, struct natrace_stack, 1);

static __always_inline s32 user_stack_id(void *ctx) {
    int zero = 0;
    struct natrace_stack *st = stack_scratch.lookup(&zero);
    if (!st)
        return -ENOMEM;
    /* bpf_get_stack zero-fills what it doesn't write */
    long len = bpf_get_stack(ctx, st->ips, sizeof(st->ips), BPF_F_USER_STACK);
    if (len <= 0)
        return len < 0 ? (s32)len : -EFAULT;
    u32 frames = len / 8;
    u64 hash = 14695981039346656037ULL;
#pragma clang loop unroll(disable)
    for (u32 i = 0; i < NATRACE_STACK_DEPTH; i++) {
        if (i >= frames)
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
