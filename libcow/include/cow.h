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

#ifdef __cplusplus
extern "C" {
#endif

/* ABI version of the loaded cow.ko (>= 1), -ENODEV if it is not loaded, -EPROTO on a mismatch
 * between the module and this library. */
int cow_version(void);

/* A static description of a negative errno returned by a cow_* function. */
const char *cow_strerror(int err);

#ifdef __cplusplus
}
#endif

#endif /* DELOREAN_COW_H */
