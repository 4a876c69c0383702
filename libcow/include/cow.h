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

/* Initialise libcow. backend: NULL or "auto" or "kmod" (mainline backends: -ENOTSUP for now).
 * Idempotent. 0 or a negative errno (-ENODEV: cow.ko is not loaded). */
int cow_init(const char *backend);

/* The backend in use: "kmod", or "none" before cow_init. */
const char *cow_backend(void);

/* Map len bytes of new covered memory, zero-filled; NULL with errno set on failure. */
void *cow_map(size_t len);

/* Snapshot all covered memory: the new id (>= 1) or a negative errno. */
int64_t cow_snapshot(void);

/* Restore all covered memory to snapshot id (newer snapshots are discarded; id stays).
 * 0, or -ENOENT for an unknown id. */
int cow_restore(int64_t id);

/* Drop snapshot id. 0 or a negative errno. */
int cow_drop(int64_t id);

#ifdef __cplusplus
}
#endif

#endif /* DELOREAN_COW_H */
