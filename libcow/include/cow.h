/* SPDX-License-Identifier: GPL-2.0 */
/*
 * cow.h — Delorean's C API: copy-on-write memory snapshots for Linux.
 *
 * Link with -lcow (libcow.so or libcow.a, built by `cargo build -p libcow`).
 * Every function returns a non-negative value on success and a negative errno on failure;
 * cow_strerror() describes such an errno.
 */
#ifndef DELOREAN_COW_H
#define DELOREAN_COW_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ABI version of the loaded cow.ko (>= 1), -ENODEV if it is not loaded, -EPROTO on a mismatch
 * between the module and this library. */
int cow_version(void);

/* A static description of a negative errno returned by a cow_* function. */
const char *cow_strerror(int err);

/* Initialise libcow with a backend: NULL or "auto" (lmc in a program compiled with cowcc, else
 * kmod if cow.ko is loaded, else uffd if the kernel has userfaultfd WP_ASYNC and PAGEMAP_SCAN,
 * else mprotect), "kmod", "uffd",
 * "mprotect", "fork" or "lmc". Idempotent for the same choice. 0 or a negative errno (-ENODEV:
 * kmod asked for but cow.ko is not loaded; -EBUSY: another backend is already in use; -EINVAL:
 * an unknown name; -ENOTSUP: lmc asked for but no code of the process was compiled with
 * cowcc; -ENOMEM: the address space is too small even for a reduced bookkeeping reservation,
 * see COW_BOOK_GIB).
 *
 * kmod covers memory from cow_map (and, under `cowctl run`, every private writable mapping but
 * stacks). uffd and mprotect cover every private writable mapping of the process except stacks
 * and libcow's own bookkeeping, including memory mapped later. lmc covers what code compiled
 * with cowcc writes (outside its own stack and libcow's bookkeeping), in 128-byte regions;
 * not yet what other code writes (libc's read(2), strcpy, its allocator's metadata). */
int cow_init(const char *backend);

/* The backend in use: "kmod", "uffd", "mprotect", "fork", "lmc", or "none" before cow_init. */
const char *cow_backend(void);

/* Why cow_init picked that backend (empty before cow_init). */
const char *cow_backend_reason(void);

/* Map len (> 0) bytes of new covered memory, zero-filled; NULL with errno set on failure
 * (EINVAL for len 0). */
void *cow_map(size_t len);

/* len zeroed bytes that no backend covers (for reference data); never freed. */
void *cow_alloc_uncovered(size_t len);

/* Snapshot all covered memory: the new id (>= 1) or a negative errno (-ENOMEM: out of memory,
 * or the retention window is full and its policy is to fail). */
int64_t cow_snapshot(void);

/* Restore all covered memory to snapshot id (newer snapshots are discarded; id stays).
 * 0, or -ENOENT for an unknown id. */
int cow_restore(int64_t id);

/* Drop snapshot id. 0, or -ENOENT for an unknown id. */
int cow_drop(int64_t id);

/* Copy len bytes at addr as they were at snapshot id into buf. 0 or a negative errno:
 * -ENOENT for an unknown id, -EFAULT when buf is NULL (len > 0) or [addr, addr + len) was not
 * covered memory at that snapshot (every backend answers the same). */
int cow_read(int64_t id, const void *addr, void *buf, size_t len);

/* Store up to cap addresses of pages written since snapshot id (sorted) into pages; return
 * how many there are in all (may exceed cap) or a negative errno (-ENOENT: unknown id;
 * -EFAULT: pages is NULL with cap > 0). pages may be NULL with cap 0, to count only. */
int64_t cow_dirty(int64_t id, void **pages, size_t cap);

/* Error recovery (OSIRIS-style recovery points). After cow_init, cow_recovery_enable(limit)
 * installs libcow's crash handler (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT; the program's own
 * handlers, set before or after, run when a crash is not recovered). 0 or a negative errno.
 * Under `cowctl run --recover` the preload has done it already. */
int cow_recovery_enable(unsigned limit);

/* The top of the caller's loop: snapshots covered memory and the used part of the calling
 * thread's stack. A fatal signal in this thread before its next recovery point restores both
 * and returns here again with 1 (errno EINTR); otherwise 0. A crash after the iteration wrote
 * to a socket, or the same instruction crashing `limit` times in a row, is not recovered. */
int cow_recovery_point(void);

#ifdef __cplusplus
}
#endif

#endif /* DELOREAN_COW_H */
