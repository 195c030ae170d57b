/* natrace's in-process allocation sampler (libnatrace_sampler.so, loaded with LD_PRELOAD).
 *
 * It interposes the malloc family and every operator new/delete, forwards each call to the
 * next allocator in the lookup order (glibc, or a jemalloc/tcmalloc preloaded after it), and
 * fires the OpenTelemetry memory-profiling USDT probes for sampled allocations only:
 *
 *   otel_memory:alloc(void *ptr, uint64_t size, uint64_t weight)   a sampled allocation
 *   otel_memory:free(void *ptr)                                    free of a sampled one
 *
 * Dormant (no tracer attached, both semaphores 0): one load and one predictable branch per
 * call before the tail call to the real allocator: four instructions in every entry point
 * (tests/test_sampler.py reads them). Traced: a thread-local countdown of bytes
 * to the next sample point, drawn from an exponential distribution with mean `period`
 * (a Poisson process over allocated bytes); an allocation whose bytes cross k points is
 * sampled with weight k * period, which is an unbiased estimate of its size (E[k] = size /
 * period). Sampled addresses go into a lock-free set so that only their frees fire.
 *
 * Arguments sit in %rdi, %rsi, %rdx at the probe (the SysV argument registers), which is
 * what the OpenTelemetry profiler reads without decoding the note's argument descriptors.
 *
 * natrace sets the period at attach by writing `natrace_sampler.period` through
 * /proc/PID/mem (the symbol is in .dynsym); NATRACE_SAMPLER_PERIOD sets the default for
 * other consumers; NATRACE_SAMPLER_SEED makes the sequence of sample points reproducible.
 * A period of 1 fires every allocation with its own size as weight (exact figures).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define _SDT_HAS_SEMAPHORES 1
#define STAP_SDT_ARG_CONSTRAINT r
#include <sys/sdt.h>

#define EXPORT __attribute__((visibility("default")))
#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)
#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)

/* The kernel (uprobe ref_ctr) or the tracer counts attached consumers in the two
 * semaphores. They share one aligned word with `boot`, set for good once a start-up
 * arena block exists, so that a dormant free or realloc tests every reason to leave its
 * tail call with a single load: free reads `free` and `boot` as one 32-bit word,
 * realloc the whole gate as 64 bits. */
static union {
    struct {
        uint16_t free;   /* otel_memory_free_semaphore */
        uint16_t boot;   /* nonzero: pointers into the start-up arena may come back */
        uint16_t alloc;  /* otel_memory_alloc_semaphore */
        uint16_t spare;
    } s;
    uint32_t free_or_boot;
    uint64_t any;
} gate __attribute__((section(".probes"), aligned(8), used));
/* sys/sdt.h names each probe's semaphore by symbol: these name the gate's halfwords. */
__asm__(".hidden otel_memory_free_semaphore\n"
        ".type otel_memory_free_semaphore, @object\n"
        ".size otel_memory_free_semaphore, 2\n"
        ".set otel_memory_free_semaphore, gate\n"
        ".hidden otel_memory_alloc_semaphore\n"
        ".type otel_memory_alloc_semaphore, @object\n"
        ".size otel_memory_alloc_semaphore, 2\n"
        ".set otel_memory_alloc_semaphore, gate + 4\n");
extern unsigned short otel_memory_free_semaphore, otel_memory_alloc_semaphore;
#define ALLOC_ON() unlikely(LOAD(gate.s.alloc))
#define FREE_ON() unlikely(LOAD(gate.s.free))

#define DEFAULT_PERIOD (512u << 10)

/* What natrace reads and writes in the target (layout versioned by `version`). */
struct natrace_sampler_config {
    char magic[8];         /* "NTSAMPLR" */
    uint32_t version;      /* 2 (1: no `interposing`) */
    uint32_t set_slots;    /* capacity of the sampled-address set */
    uint64_t period;       /* mean bytes between sample points; natrace writes it */
    uint64_t sampled;      /* alloc probes fired */
    uint64_t dropped;      /* sample points not fired: the address set was full */
    uint64_t tracked;      /* addresses in the set now */
    /* version 2: 1 when the process's malloc is this library's (preloaded, or linked in
     * ahead of the allocator); 0 when it came later (dlopen), so that nothing calls it
     * and its probes would never fire: a tracer should hook the allocator instead */
    uint32_t interposing;
    uint32_t reserved;
};
EXPORT struct natrace_sampler_config natrace_sampler = {
    .magic = "NTSAMPLR", .version = 2, .period = DEFAULT_PERIOD,
};

/* ---- the next allocator ---------------------------------------------------------------- */

/* Each pointer starts at a boot_* stub that resolves them all, so the hot path never tests
 * whether start-up is done. While dlsym runs (it may calloc) allocations come from a
 * static arena, and freeing those is a no-op. */
static void *boot_malloc(size_t);
static void boot_free(void *);
static void *boot_calloc(size_t, size_t);
static void *boot_realloc(void *, size_t);
static int boot_posix_memalign(void **, size_t, size_t);
static void *boot_aligned_alloc(size_t, size_t);
static void *boot_memalign(size_t, size_t);
static void *boot_valloc(size_t);
static void *boot_pvalloc(size_t);

static struct {
    void *(*malloc)(size_t);
    void (*free)(void *);
    void *(*calloc)(size_t, size_t);
    void *(*realloc)(void *, size_t);
    int (*posix_memalign)(void **, size_t, size_t);
    void *(*aligned_alloc)(size_t, size_t);
    void *(*memalign)(size_t, size_t);
    void *(*valloc)(size_t);
    void *(*pvalloc)(size_t);
} next = {
    boot_malloc, boot_free, boot_calloc, boot_realloc,
    boot_posix_memalign, boot_aligned_alloc, boot_memalign, boot_valloc, boot_pvalloc,
};

#define ARENA_SIZE (64u << 10)
static char arena[ARENA_SIZE] __attribute__((aligned(64)));
static size_t arena_used;
static int resolving;

static inline int in_arena(const void *p) {
    return (uintptr_t)p - (uintptr_t)arena < ARENA_SIZE;
}

/* Blocks carry their size in the 16 bytes before them (for realloc). */
static void *arena_alloc(size_t n, size_t align) {
    if (align < 16)
        align = 16;
    size_t need = ((n + 15) & ~(size_t)15) + align;
    size_t at = __atomic_fetch_add(&arena_used, need, __ATOMIC_RELAXED);
    if (n > ARENA_SIZE || at + need > ARENA_SIZE)
        return NULL;
    __atomic_store_n(&gate.s.boot, 1, __ATOMIC_RELAXED);  /* before the block is handed out */
    uintptr_t p = ((uintptr_t)arena + at + 16 + align - 1) & ~(uintptr_t)(align - 1);
    ((size_t *)p)[-1] = n;
    return (void *)p;
}

static void *find(const char *name, void *fallback) {
    void *f = dlsym(RTLD_NEXT, name);
    return f ? f : fallback;
}

static void resolve(void) {
    if (next.malloc != boot_malloc)
        return;
    __atomic_store_n(&resolving, 1, __ATOMIC_SEQ_CST);
    void *m = dlsym(RTLD_NEXT, "malloc"), *f = dlsym(RTLD_NEXT, "free");
    void *c = dlsym(RTLD_NEXT, "calloc"), *r = dlsym(RTLD_NEXT, "realloc");
    if (!m || !f || !c || !r)
        abort();  /* no allocator after us: nothing sensible to forward to */
    next.free = f;
    next.calloc = c;
    next.realloc = r;
    next.posix_memalign = find("posix_memalign", NULL);
    next.aligned_alloc = find("aligned_alloc", NULL);
    next.memalign = find("memalign", NULL);
    next.valloc = find("valloc", NULL);
    next.pvalloc = find("pvalloc", NULL);
    __atomic_store_n(&next.malloc, m, __ATOMIC_RELEASE);
    __atomic_store_n(&resolving, 0, __ATOMIC_SEQ_CST);
}

#define BOOTING() unlikely(__atomic_load_n(&resolving, __ATOMIC_SEQ_CST))

static void *boot_malloc(size_t n) {
    if (BOOTING())
        return arena_alloc(n, 16);
    resolve();
    return next.malloc(n);
}
static void boot_free(void *p) {
    if (BOOTING() || in_arena(p))
        return;
    resolve();
    next.free(p);
}
static void *boot_calloc(size_t n, size_t m) {
    if (BOOTING()) {
        size_t t;
        return __builtin_mul_overflow(n, m, &t) ? NULL : arena_alloc(t, 16);  /* zeroed: .bss */
    }
    resolve();
    return next.calloc(n, m);
}
static void *boot_realloc(void *p, size_t n) {
    resolve();
    return next.realloc(p, n);
}

/* Entry points an allocator may lack: emulate them on the ones it has. */
static void *emul_aligned(size_t align, size_t n) {
    void *p = NULL;
    int err = next.posix_memalign ? next.posix_memalign(&p, align, n) : ENOMEM;
    if (err) {
        errno = err;
        return NULL;
    }
    return p;
}
static int boot_posix_memalign(void **out, size_t align, size_t n) {
    resolve();
    return next.posix_memalign ? next.posix_memalign(out, align, n) : ENOMEM;
}
static void *boot_aligned_alloc(size_t align, size_t n) {
    resolve();
    return next.aligned_alloc ? next.aligned_alloc(align, n) : emul_aligned(align, n);
}
static void *boot_memalign(size_t align, size_t n) {
    resolve();
    return next.memalign ? next.memalign(align, n) : emul_aligned(align, n);
}
static void *boot_valloc(size_t n) {
    resolve();
    return next.valloc ? next.valloc(n) : emul_aligned((size_t)sysconf(_SC_PAGESIZE), n);
}
static void *boot_pvalloc(size_t n) {
    resolve();
    if (next.pvalloc)
        return next.pvalloc(n);
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    return emul_aligned(page, (n + page - 1) & ~(page - 1));
}

/* ---- the set of sampled addresses -------------------------------------------------------
 * Open addressing over 2^SET_BITS slots (mapped on first use, pages touched as filled),
 * bounded linear probing, deleted slots become tombstones that later inserts reuse. In
 * front of it a counting filter small enough to stay in cache: a free whose group has no
 * sampled address (nearly all of them) costs one load. Addresses are unique among live
 * blocks, and a block is inserted before malloc returns it and removed before the real
 * free, so two threads never race on one address. */
#define SET_BITS 20
#define FILTER_BITS 15
#define PROBES 64
#define TOMB ((uintptr_t)1)

static uintptr_t *slots;
static uint16_t filter[1u << FILTER_BITS];

static inline uint64_t hash(const void *p) {
    return ((uintptr_t)p >> 4) * 0x9E3779B97F4A7C15ull;
}
#define SLOT(h) ((h) >> (64 - SET_BITS))
#define GROUP(h) ((h) >> (64 - FILTER_BITS))

static uintptr_t *set_slots(void) {
    uintptr_t *s = __atomic_load_n(&slots, __ATOMIC_ACQUIRE);
    if (likely(s != NULL))
        return s;
    void *m = mmap(NULL, sizeof(uintptr_t) << SET_BITS, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED)
        return NULL;
    if (!__atomic_compare_exchange_n(&slots, &s, (uintptr_t *)m, 0, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE))
        munmap(m, sizeof(uintptr_t) << SET_BITS);  /* another thread mapped it first */
    return __atomic_load_n(&slots, __ATOMIC_ACQUIRE);
}

static int set_insert(const void *p) {
    uintptr_t *s = set_slots(), key = (uintptr_t)p;
    if (s == NULL)
        return 0;
    uint64_t h = hash(p), home = SLOT(h), mask = (1u << SET_BITS) - 1;
    /* an address left from an earlier session (freed while dormant) is reused in place */
    for (unsigned i = 0; i < PROBES; i++) {
        uintptr_t v = LOAD(s[(home + i) & mask]);
        if (v == key)
            return 1;
        if (v == 0)
            break;
    }
    __atomic_fetch_add(&filter[GROUP(h)], 1, __ATOMIC_SEQ_CST);
    for (unsigned i = 0; i < PROBES; i++) {
        uintptr_t *slot = &s[(home + i) & mask], v = LOAD(*slot);
        if ((v == 0 || v == TOMB) &&
            __atomic_compare_exchange_n(slot, &v, key, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
            __atomic_fetch_add(&natrace_sampler.tracked, 1, __ATOMIC_RELAXED);
            return 1;
        }
    }
    __atomic_fetch_sub(&filter[GROUP(h)], 1, __ATOMIC_SEQ_CST);
    return 0;
}

static int set_remove(const void *p) {
    uint64_t h = hash(p);
    if (likely(LOAD(filter[GROUP(h)]) == 0))
        return 0;
    uintptr_t *s = __atomic_load_n(&slots, __ATOMIC_ACQUIRE), key = (uintptr_t)p;
    if (s == NULL)
        return 0;
    uint64_t home = SLOT(h), mask = (1u << SET_BITS) - 1;
    for (unsigned i = 0; i < PROBES; i++) {
        uintptr_t *slot = &s[(home + i) & mask], v = LOAD(*slot);
        if (v == 0)
            return 0;
        if (v == key && __atomic_compare_exchange_n(slot, &v, TOMB, 0, __ATOMIC_SEQ_CST,
                                                    __ATOMIC_RELAXED)) {
            __atomic_fetch_sub(&filter[GROUP(h)], 1, __ATOMIC_SEQ_CST);
            __atomic_fetch_sub(&natrace_sampler.tracked, 1, __ATOMIC_RELAXED);
            return 1;
        }
    }
    return 0;
}

/* ---- the probes ------------------------------------------------------------------------- */

static __attribute__((noinline)) void fire_alloc(void *ptr, uint64_t size, uint64_t weight) {
#if defined(__x86_64__)
    register void *a0 __asm__("rdi") = ptr;
    register uint64_t a1 __asm__("rsi") = size;
    register uint64_t a2 __asm__("rdx") = weight;
#elif defined(__aarch64__)
    register void *a0 __asm__("x0") = ptr;
    register uint64_t a1 __asm__("x1") = size;
    register uint64_t a2 __asm__("x2") = weight;
#else
    void *a0 = ptr;
    uint64_t a1 = size, a2 = weight;
#endif
    STAP_PROBE3(otel_memory, alloc, a0, a1, a2);
}

static __attribute__((noinline)) void fire_free(void *ptr) {
#if defined(__x86_64__)
    register void *a0 __asm__("rdi") = ptr;
#elif defined(__aarch64__)
    register void *a0 __asm__("x0") = ptr;
#else
    void *a0 = ptr;
#endif
    STAP_PROBE1(otel_memory, free, a0);
}

/* ---- sampling --------------------------------------------------------------------------- */

struct thread_state {
    int64_t countdown;   /* bytes to the next sample point; < 0 once crossed */
    uint64_t drawn;      /* the period the countdown was drawn with; 0: not started */
    uint64_t rng;
    int busy;            /* inside sample(): a signal handler's malloc only counts down */
};
static __thread struct thread_state ts __attribute__((tls_model("initial-exec")));
static uint64_t seed_base;
static uint64_t threads_seeded;

static inline uint64_t splitmix(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void seed_thread(struct thread_state *t) {
    uint64_t n = __atomic_add_fetch(&threads_seeded, 1, __ATOMIC_RELAXED);
    t->rng = seed_base ? seed_base + n * 0xD1B54A32D192ED03ull
                       : (uint64_t)__builtin_ia32_rdtsc() ^ (uintptr_t)t ^ ((uint64_t)getpid() << 32);
}

/* An exponential draw with the given mean (inverse transform; u in (0, 1]), rounded to
 * the nearest byte so the mean spacing stays `mean`. A 0 puts two points at one byte. */
static int64_t draw(struct thread_state *t, uint64_t mean) {
    double u = (double)((splitmix(&t->rng) >> 11) + 1) * 0x1.0p-53;
    double d = -log(u) * (double)mean + 0.5;
    return d >= 9.2e18 ? INT64_MAX : (int64_t)d;
}

/* NATRACE_SAMPLER_PERIOD and _SEED, read once: by the constructor, or by the first sample
 * when a library initialised before this one allocates (libstdc++'s emergency pool does,
 * with the probes already on in a launched process), so that its draw already has the
 * period asked for. Never later than the constructor, so natrace's own writes of the
 * period to a running process stand. */
static int environment_read;

static void read_environment(void) {
    if (__atomic_exchange_n(&environment_read, 1, __ATOMIC_ACQ_REL))
        return;
    const char *period = getenv("NATRACE_SAMPLER_PERIOD");
    if (period && *period) {
        unsigned long long v = strtoull(period, NULL, 10);
        if (v > 0)
            natrace_sampler.period = v;
    }
    const char *seed = getenv("NATRACE_SAMPLER_SEED");
    if (seed && *seed)
        seed_base = strtoull(seed, NULL, 10) | 1;
}

static __attribute__((noinline, cold)) void sample(void *p, size_t n) {
    struct thread_state *t = &ts;
    if (t->busy)
        return;
    t->busy = 1;
    if (unlikely(!LOAD(environment_read)))
        read_environment();
    uint64_t period = LOAD(natrace_sampler.period);
    if (period == 0)
        period = DEFAULT_PERIOD;
    uint64_t weight = 0;
    if (period == 1) {
        /* every byte: each allocation fires with its own size (exact, for tests) */
        t->countdown = 0;
        t->drawn = 1;
        weight = n;
        goto fire;
    }
    if (t->drawn == 0) {
        /* the thread's first traced allocation starts its process: no point at 0 */
        if (t->rng == 0)
            seed_thread(t);
        t->drawn = period;
        t->countdown += draw(t, period);
    }
    int64_t c = t->countdown;
    while (c < 0) {
        weight += t->drawn;  /* the point that ended the current interval */
        t->drawn = period;
        int64_t rest = -c;
        if ((uint64_t)rest > 64 * period) {
            /* a block spanning many intervals: whole periods count one point each
             * (expectation kept), the remainder is drawn as usual */
            uint64_t k = (uint64_t)rest / period;
            weight += k * period;
            c += (int64_t)(k * period);
        }
        c += draw(t, period);
    }
    t->countdown = c;
fire:
    if (weight != 0) {
        if (FREE_ON() && !set_insert(p))
            __atomic_fetch_add(&natrace_sampler.dropped, 1, __ATOMIC_RELAXED);
        else {
            __atomic_fetch_add(&natrace_sampler.sampled, 1, __ATOMIC_RELAXED);
            fire_alloc(p, n, weight);
        }
    }
    t->busy = 0;
}

/* n bytes allocated (or, before the call, about to be) are counted down: 1 when they
 * cross a sample point. Counted before the call, an allocation that crosses none can be
 * a tail call: no frame, no return through the sampler. */
static inline int crosses(size_t n) {
    struct thread_state *t = &ts;
    t->countdown -= (int64_t)n;
    return unlikely(t->countdown < 0);
}

/* A block allocated: counted, and sampled when it crossed a point. */
static inline void *account(void *p, size_t n) {
    if (likely(p != NULL) && crosses(n))
        sample(p, n);
    return p;
}

/* After crosses(): sample the block, or give its bytes back when there is none. */
static __attribute__((noinline)) void *sampled(void *p, size_t n) {
    if (likely(p != NULL))
        sample(p, n);
    else
        ts.countdown += (int64_t)n;
    return p;
}

/* Called before the real free: after it another thread may get the address back. */
static inline void forget(void *p) {
    if (p != NULL && set_remove(p))
        fire_free(p);
}

/* ---- the C entry points ------------------------------------------------------------------ */

static __attribute__((noinline)) void *traced_malloc(size_t n) {
    if (crosses(n))
        return sampled(next.malloc(n), n);
    return next.malloc(n);
}
EXPORT void *malloc(size_t n) {
    if (ALLOC_ON())
        return traced_malloc(n);
    return next.malloc(n);
}

/* A free that has to look further: traced, or a start-up arena block may be coming back. */
static __attribute__((noinline)) void gated_free(void *p) {
    if (unlikely(LOAD(gate.s.boot))) {
        if (in_arena(p))
            return;
        if (!FREE_ON())
            return next.free(p);
    }
    forget(p);  /* without arena blocks only a tracer opens the gate */
    next.free(p);
}
EXPORT void free(void *p) {
    if (unlikely(LOAD(gate.free_or_boot)))
        return gated_free(p);
    next.free(p);
}

static __attribute__((noinline)) void *sampled_calloc(size_t n, size_t m) {
    return sampled(next.calloc(n, m), n * m);  /* NULL when n * m overflows: given back */
}
static __attribute__((noinline)) void *traced_calloc(size_t n, size_t m) {
    if (crosses(n * m))
        return sampled_calloc(n, m);
    return next.calloc(n, m);
}
EXPORT void *calloc(size_t n, size_t m) {
    if (ALLOC_ON())
        return traced_calloc(n, m);
    return next.calloc(n, m);
}

static void *arena_realloc(void *p, size_t n) {
    size_t old = ((size_t *)p)[-1];
    void *q = malloc(n);
    if (q != NULL)
        memcpy(q, p, old < n ? old : n);
    return q;
}

static __attribute__((noinline)) void *gated_realloc(void *p, size_t n) {
    if (unlikely(in_arena(p)))
        return arena_realloc(p, n);
    if (FREE_ON())
        forget(p);  /* a failed realloc leaves p live but untracked */
    void *q = next.realloc(p, n);
    return ALLOC_ON() && n != 0 ? account(q, n) : q;
}
EXPORT void *realloc(void *p, size_t n) {
    if (unlikely(LOAD(gate.any)))
        return gated_realloc(p, n);
    return next.realloc(p, n);
}

/* glibc's reallocarray calls realloc through the PLT, that is ours: built on our realloc
 * instead, every allocator's block is counted exactly once. */
EXPORT void *reallocarray(void *p, size_t n, size_t m) {
    size_t t;
    if (__builtin_mul_overflow(n, m, &t)) {
        errno = ENOMEM;
        return NULL;
    }
    return realloc(p, t);
}

static __attribute__((noinline)) int traced_posix_memalign(void **out, size_t align, size_t n) {
    int err = next.posix_memalign(out, align, n);
    if (err == 0)
        account(*out, n);
    return err;
}
EXPORT int posix_memalign(void **out, size_t align, size_t n) {
    if (ALLOC_ON())
        return traced_posix_memalign(out, align, n);
    return next.posix_memalign(out, align, n);
}

static size_t page_round(size_t n) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    return n ? (n + page - 1) & ~(page - 1) : page;
}

#define ALIGNED(name, params, args, size)                  \
    EXPORT void *name params {                             \
        if (likely(!ALLOC_ON()))                           \
            return next.name args;                         \
        return account(next.name args, size);              \
    }
ALIGNED(aligned_alloc, (size_t align, size_t n), (align, n), n)
ALIGNED(memalign, (size_t align, size_t n), (align, n), n)
ALIGNED(valloc, (size_t n), (n), n)
/* pvalloc hands out whole pages: counted as such, as natrace's uprobes count it */
ALIGNED(pvalloc, (size_t n), (n), page_round(n))

/* ---- operator new and delete ------------------------------------------------------------
 * Forwarded to the next definition (libstdc++'s, or an allocator's own) while dormant.
 * Traced, an allocator's own new (jemalloc, tcmalloc), which bypasses malloc, is called and
 * its block sampled; libstdc++'s, which calls malloc, is done here on the real allocator.
 * libstdc++'s delete calls free, which is ours; an allocator's own delete gets the free
 * probe here. With no next definition (libstdc++ loaded RTLD_LOCAL) they are built on
 * malloc/free. */
typedef struct { size_t v; } align_t;  /* std::align_val_t, passed like a size_t */
static int cxx_own;  /* the next operator new does not go through malloc */

static void *cxx_fail(int nothrow) {
    if (nothrow)
        return NULL;
    void (*thrower)(void) = (void (*)(void))dlsym(RTLD_DEFAULT, "_ZSt17__throw_bad_allocv");
    if (thrower)
        thrower();
    abort();
}
static void *cxx_alloc(size_t n, size_t align) {
    if (align <= 16)
        return next.malloc(n ? n : 1);
    void *p = NULL;
    return next.posix_memalign(&p, align, n ? n : 1) == 0 ? p : NULL;
}

static void *fb_new(size_t n, int nothrow) {
    void *p = malloc(n ? n : 1);
    return p ? p : cxx_fail(nothrow);
}
static void *fb_new_aligned(size_t n, size_t align, int nothrow) {
    void *p = NULL;
    if (posix_memalign(&p, align < sizeof(void *) ? sizeof(void *) : align, n ? n : 1) != 0)
        return cxx_fail(nothrow);
    return p;
}

/* Each operator: kind, symbol, parameters, arguments, size, alignment, fallback body. */
#define CXX_OPERATORS(X)                                                                      \
    X(new, _Znwm, (size_t n), (n), n, 0, return fb_new(n, 0);)                                \
    X(new, _Znam, (size_t n), (n), n, 0, return fb_new(n, 0);)                                \
    X(new, _ZnwmRKSt9nothrow_t, (size_t n, const void *nt), (n, nt), n, 0,                    \
      return fb_new(n, 1);)                                                                   \
    X(new, _ZnamRKSt9nothrow_t, (size_t n, const void *nt), (n, nt), n, 0,                    \
      return fb_new(n, 1);)                                                                   \
    X(new, _ZnwmSt11align_val_t, (size_t n, align_t a), (n, a), n, a.v,                       \
      return fb_new_aligned(n, a.v, 0);)                                                      \
    X(new, _ZnamSt11align_val_t, (size_t n, align_t a), (n, a), n, a.v,                       \
      return fb_new_aligned(n, a.v, 0);)                                                      \
    X(new, _ZnwmSt11align_val_tRKSt9nothrow_t, (size_t n, align_t a, const void *nt),         \
      (n, a, nt), n, a.v, return fb_new_aligned(n, a.v, 1);)                                  \
    X(new, _ZnamSt11align_val_tRKSt9nothrow_t, (size_t n, align_t a, const void *nt),         \
      (n, a, nt), n, a.v, return fb_new_aligned(n, a.v, 1);)                                  \
    X(delete, _ZdlPv, (void *p), (p), 0, 0, free(p);)                                         \
    X(delete, _ZdaPv, (void *p), (p), 0, 0, free(p);)                                         \
    X(delete, _ZdlPvRKSt9nothrow_t, (void *p, const void *nt), (p, nt), 0, 0, free(p);)       \
    X(delete, _ZdaPvRKSt9nothrow_t, (void *p, const void *nt), (p, nt), 0, 0, free(p);)       \
    X(delete, _ZdlPvm, (void *p, size_t n), (p, n), 0, 0, free(p);)                           \
    X(delete, _ZdaPvm, (void *p, size_t n), (p, n), 0, 0, free(p);)                           \
    X(delete, _ZdlPvSt11align_val_t, (void *p, align_t a), (p, a), 0, 0, free(p);)            \
    X(delete, _ZdaPvSt11align_val_t, (void *p, align_t a), (p, a), 0, 0, free(p);)            \
    X(delete, _ZdlPvmSt11align_val_t, (void *p, size_t n, align_t a), (p, n, a), 0, 0,        \
      free(p);)                                                                               \
    X(delete, _ZdaPvmSt11align_val_t, (void *p, size_t n, align_t a), (p, n, a), 0, 0,        \
      free(p);)                                                                               \
    X(delete, _ZdlPvSt11align_val_tRKSt9nothrow_t, (void *p, align_t a, const void *nt),      \
      (p, a, nt), 0, 0, free(p);)                                                             \
    X(delete, _ZdaPvSt11align_val_tRKSt9nothrow_t, (void *p, align_t a, const void *nt),      \
      (p, a, nt), 0, 0, free(p);)

#define RET_new void *
#define RET_delete void

/* next_SYM starts at boot_SYM, which resolves every operator on first use; an operator
 * with no next definition gets fb_SYM, built on malloc/free. */
#define DECLARE(kind, sym, params, args, size, align, fallback)                                    \
    static RET_##kind fb_##sym params { fallback }                                          \
    static RET_##kind boot_##sym params;                                                    \
    static RET_##kind(*next_##sym) params = boot_##sym;
CXX_OPERATORS(DECLARE)

static void resolve_cxx(void) {
    static int done;
    if (__atomic_load_n(&done, __ATOMIC_ACQUIRE))
        return;
    resolve();
    void *nw = dlsym(RTLD_NEXT, "_Znwm");
    Dl_info info;
    cxx_own = nw != NULL && dladdr(nw, &info) && info.dli_fname &&
              strstr(info.dli_fname, "libstdc++") == NULL;
#define RESOLVE(kind, sym, params, args, size, align, fallback)                                    \
    {                                                                                       \
        void *f = dlsym(RTLD_NEXT, #sym);                                                   \
        __atomic_store_n((void **)&next_##sym, f ? f : (void *)fb_##sym, __ATOMIC_RELEASE); \
    }
    CXX_OPERATORS(RESOLVE)
    __atomic_store_n(&done, 1, __ATOMIC_RELEASE);
}

/* Traced, over libstdc++: the block comes from the real allocator here, so the stack the
 * probe fires from runs through this frame (libstdc++'s new has no frame pointer, and a
 * walk through it would skip its caller); only a failure goes to libstdc++'s new, for
 * its new_handler loop and bad_alloc. */
#define TRACED_new(sym, args, size, align)                                                  \
    if (cxx_own)                                                                            \
        return account(next_##sym args, size);                                              \
    void *p = cxx_alloc(size, align);                                                       \
    if (unlikely(p == NULL))                                                                \
        return next_##sym args;                                                             \
    return account(p, size);
#define TRACED_delete(sym, args, size, align)                                               \
    if (cxx_own)                                                                            \
        forget(p);                                                                          \
    next_##sym args;
#define ON_new ALLOC_ON
#define ON_delete FREE_ON

/* Dormant, each operator is its semaphore's test and a tail call; the rest is out of line. */
#define DEFINE(kind, sym, params, args, size, align, fallback)                                     \
    static RET_##kind boot_##sym params {                                                   \
        resolve_cxx();                                                                      \
        return next_##sym args;                                                             \
    }                                                                                       \
    static __attribute__((noinline)) RET_##kind traced_##sym params {                       \
        TRACED_##kind(sym, args, size, align)                                               \
    }                                                                                       \
    EXPORT RET_##kind sym params {                                                          \
        if (ON_##kind())                                                                    \
            return traced_##sym args;                                                       \
        return next_##sym args;                                                             \
    }
CXX_OPERATORS(DEFINE)

/* ---- process life ------------------------------------------------------------------------ */

static void after_fork_child(void) {
    /* the child would otherwise draw the same sample points as its parent */
    ts.rng = 0;
    ts.drawn = 0;
    ts.countdown = 0;
}

/* Is the process's malloc ours? Lookups bind in load order: preloaded, this library
 * comes before the allocator; dlopen'ed, after it (or in a scope of its own). */
static int interposes(void);

static __attribute__((constructor)) void init(void) {
    resolve();
    natrace_sampler.interposing = (uint32_t)interposes();
    read_environment();
    natrace_sampler.set_slots = 1u << SET_BITS;
    pthread_atfork(NULL, NULL, after_fork_child);
}

/* Objects are searched in load order (dl_iterate_phdr's): the executable, the preloaded
 * libraries, their dependencies, then whatever dlopen added. Interposing means coming
 * before the allocator we forward to. (dlsym(RTLD_DEFAULT, "malloc") cannot tell: in a
 * non-PIE executable that takes malloc's address, node's, it is the executable's PLT.) */
struct load_order {
    uintptr_t ours, allocator;
    int answer;  /* 1: ours came first, 0: the allocator did, -1: neither seen */
};

static int visit(struct dl_phdr_info *info, size_t size, void *arg) {
    struct load_order *o = arg;
    if (info->dlpi_addr == o->ours || info->dlpi_addr == o->allocator) {
        o->answer = info->dlpi_addr == o->ours;
        return 1;
    }
    return 0;
}

static int interposes(void) {
    Dl_info ours, allocator;
    if (!dladdr((void *)init, &ours) || !dladdr((void *)next.malloc, &allocator))
        return 0;
    struct load_order o = {(uintptr_t)ours.dli_fbase, (uintptr_t)allocator.dli_fbase, -1};
    dl_iterate_phdr(visit, &o);
    return o.answer == 1;
}
