/* What natrace's BPF C does differently because of bcc's compiler (0.26, Debian 12).
 *
 * bcc checks, for every call of bpf_probe_read_user it visits, that the kernel has the
 * helper by looking its name up in /proc/kallsyms, and its symbol cache rebuilds a
 * name map of every kernel symbol (~120k) on each lookup (kallsyms holds duplicate
 * names, which its staleness check takes for a change): ~70 ms of CPU per call site,
 * 40% of alloc.bpf.c's compile. Called under another name, the helper is the same
 * instruction and bcc looks nothing up. natrace needs ring buffers (Linux 5.8), so the
 * kernel has bpf_probe_read_user (5.5).
 */
#ifndef NATRACE_BCC_H
#define NATRACE_BCC_H

static int (*natrace_probe_read_user)(void *dst, u32 size, const void *unsafe_ptr) =
    (void *)BPF_FUNC_probe_read_user;
#define bpf_probe_read_user natrace_probe_read_user

#endif
