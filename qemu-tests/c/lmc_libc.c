/*
 * lmc and memory written by code that was not compiled with cowcc: libc functions writing
 * into the program's globals, each between a snapshot and a restore. After the restore the
 * buffer must hold its bytes at the snapshot again. Compiled with cowcc (its wrappers save
 * the bytes first). Prints one line per case; exits non-zero on the first that fails.
 */
#define _GNU_SOURCE
#include <cow.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

static char buf[8192];
static char before[sizeof buf];
static int fds[2];
static const char *text = "written by libc, not by instrumented code";

static int by_value(const void *a, const void *b)
{
	return *(const char *)b - *(const char *)a;
}

/* Reached through pointers the compiler cannot see through. */
static void *(*volatile copy)(void *, const void *, size_t) = memcpy;
static void *(*volatile move)(void *, const void *, size_t) = memmove;
static void *(*volatile set)(void *, int, size_t) = memset;

static void feed(void)
{
	if (write(fds[1], text, strlen(text) + 1) < 0)
		exit(90);
}

static int vformat(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf + 10, 100, fmt, ap);
	va_end(ap);
	return n;
}

static void run(const char *name, void (*writer)(void))
{
	for (size_t i = 0; i < sizeof buf; i++)
		buf[i] = (char)('a' + i % 26);
	memcpy(before, buf, sizeof buf);
	int64_t id = cow_snapshot();
	if (id < 1)
		exit(91);
	writer();
	if (!memcmp(before, buf, sizeof buf)) {
		fprintf(stderr, "lmc_libc: %s wrote nothing: the test proves nothing\n", name);
		exit(92);
	}
	if (cow_restore(id) != 0 || cow_drop(id) != 0)
		exit(93);
	size_t i = 0;
	while (i < sizeof buf && buf[i] == before[i])
		i++;
	if (i < sizeof buf) {
		fprintf(stderr, "lmc_libc: %s: byte %zu not restored\n", name, i);
		exit(1);
	}
	printf("lmc_libc: %s restored\n", name);
}

static void w_read(void) { feed(); if (read(fds[0], buf + 5, sizeof buf - 5) < 1) exit(94); }
static void w_pread(void)
{
	FILE *f = tmpfile();
	if (!f || fputs(text, f) < 0 || fflush(f))
		exit(94);
	if (pread(fileno(f), buf + 3, 20, 0) != 20)
		exit(94);
	fclose(f);
}
static void w_readv(void)
{
	feed();
	struct iovec iov[2] = {{buf + 1, 7}, {buf + 4000, 300}};
	if (readv(fds[0], iov, 2) < 8)
		exit(94);
}
static void w_recv(void) { feed(); if (recv(fds[0], buf + 130, 500, 0) < 1) exit(94); }
static void w_recvfrom(void) { feed(); if (recvfrom(fds[0], buf + 250, 500, 0, NULL, NULL) < 1) exit(94); }
static void w_recvmsg(void)
{
	feed();
	struct iovec iov = {buf + 700, 600};
	struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
	if (recvmsg(fds[0], &msg, 0) < 1)
		exit(94);
}
static void w_fread(void)
{
	FILE *f = fmemopen((void *)text, strlen(text), "r");
	if (!f || fread(buf + 2, 1, 30, f) != 30)
		exit(94);
	fclose(f);
}
static void w_fgets(void)
{
	FILE *f = fmemopen((void *)text, strlen(text), "r");
	if (!f || !fgets(buf + 900, 40, f))
		exit(94);
	fclose(f);
}
static void w_strcpy(void) { strcpy(buf + 1000, text); }
static void w_stpcpy(void) { stpcpy(buf + 1100, text); }
static void w_strncpy(void) { strncpy(buf + 1200, text, 300); }
static void w_strcat(void) { buf[1300] = 0; strcat(buf + 1290, text); }
static void w_strncat(void) { buf[1500] = 0; strncat(buf + 1490, text, 9); }
static void w_sprintf(void) { sprintf(buf + 1600, "%s %d %s", text, 42, text); }
static void w_snprintf(void) { snprintf(buf + 1700, 30, "%s %d", text, 7); }
static void w_vsnprintf(void) { vformat("%s/%s", text, text); }
static void w_memcpy_ptr(void) { copy(buf + 2000, text, 33); }
static void w_memmove_ptr(void) { move(buf + 2100, buf + 2050, 400); }
static void w_memset_ptr(void) { set(buf + 3000, 0, 1000); }
static void w_qsort(void) { qsort(buf + 5000, 3000, 1, by_value); }

int main(void)
{
	int rc = cow_init("lmc");
	if (rc < 0) {
		fprintf(stderr, "cow_init(lmc): %s\n", cow_strerror(rc));
		return 2;
	}
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, fds))
		return 3;
	struct {
		const char *name;
		void (*writer)(void);
	} cases[] = {
		{"read", w_read},		{"pread", w_pread},
		{"readv", w_readv},		{"recv", w_recv},
		{"recvfrom", w_recvfrom},	{"recvmsg", w_recvmsg},
		{"fread", w_fread},		{"fgets", w_fgets},
		{"strcpy", w_strcpy},		{"stpcpy", w_stpcpy},
		{"strncpy", w_strncpy},		{"strcat", w_strcat},
		{"strncat", w_strncat},		{"sprintf", w_sprintf},
		{"snprintf", w_snprintf},	{"vsnprintf", w_vsnprintf},
		{"memcpy through a pointer", w_memcpy_ptr},
		{"memmove through a pointer", w_memmove_ptr},
		{"memset through a pointer", w_memset_ptr},
		{"qsort", w_qsort},
	};
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
		run(cases[i].name, cases[i].writer);
	printf("lmc_libc: %zu cases, zero differences\n", sizeof cases / sizeof cases[0]);
	return 0;
}
