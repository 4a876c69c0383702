/*
 * lmc: libc functions that write the caller's memory without going through instrumented code.
 * cowcc links programs with this object and -Wl,--wrap=NAME for each of these, so the
 * program's own calls (and its references to them, function pointers included) reach
 * __wrap_NAME, which saves the bytes about to be written (__cow_lmc_write: the regions not yet
 * saved in this generation) and calls libc's NAME through __real_NAME. Calls from inside libc
 * or other uninstrumented libraries are not seen (documented).
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

void __cow_lmc_write(void *p, uint64_t n);
ssize_t __real_read(int, void *, size_t);
ssize_t __real_pread(int, void *, size_t, off_t);
ssize_t __real_readv(int, const struct iovec *, int);
ssize_t __real_preadv(int, const struct iovec *, int, off_t);
ssize_t __real_recv(int, void *, size_t, int);
ssize_t __real_recvfrom(int, void *, size_t, int, struct sockaddr *, socklen_t *);
ssize_t __real_recvmsg(int, struct msghdr *, int);
size_t __real_fread(void *, size_t, size_t, FILE *);
char *__real_fgets(char *, int, FILE *);
char *__real_strcpy(char *, const char *);
char *__real_stpcpy(char *, const char *);
char *__real_strncpy(char *, const char *, size_t);
char *__real_strcat(char *, const char *);
char *__real_strncat(char *, const char *, size_t);
void *__real_memcpy(void *, const void *, size_t);
void *__real_memmove(void *, const void *, size_t);
void *__real_memset(void *, int, size_t);
void __real_qsort(void *, size_t, size_t, int (*)(const void *, const void *));
int __real_vsprintf(char *, const char *, va_list);
int __real_vsnprintf(char *, size_t, const char *, va_list);

static void save(void *p, size_t n)
{
	if (p && n)
		__cow_lmc_write(p, n);
}

static void save_iov(const struct iovec *iov, int n)
{
	for (int i = 0; iov && i < n; i++)
		save(iov[i].iov_base, iov[i].iov_len);
}

ssize_t __wrap_read(int fd, void *buf, size_t n)
{
	save(buf, n);
	return __real_read(fd, buf, n);
}

ssize_t __wrap_pread(int fd, void *buf, size_t n, off_t off)
{
	save(buf, n);
	return __real_pread(fd, buf, n, off);
}

ssize_t __wrap_readv(int fd, const struct iovec *iov, int n)
{
	save_iov(iov, n);
	return __real_readv(fd, iov, n);
}

ssize_t __wrap_preadv(int fd, const struct iovec *iov, int n, off_t off)
{
	save_iov(iov, n);
	return __real_preadv(fd, iov, n, off);
}

ssize_t __wrap_recv(int fd, void *buf, size_t n, int flags)
{
	save(buf, n);
	return __real_recv(fd, buf, n, flags);
}

ssize_t __wrap_recvfrom(int fd, void *buf, size_t n, int flags, struct sockaddr *addr,
			socklen_t *len)
{
	save(buf, n);
	if (addr && len) {
		save(addr, *len);
		save(len, sizeof *len);
	}
	return __real_recvfrom(fd, buf, n, flags, addr, len);
}

ssize_t __wrap_recvmsg(int fd, struct msghdr *msg, int flags)
{
	if (msg) {
		save(msg, sizeof *msg);
		save_iov(msg->msg_iov, (int)msg->msg_iovlen);
		save(msg->msg_name, msg->msg_namelen);
		save(msg->msg_control, msg->msg_controllen);
	}
	return __real_recvmsg(fd, msg, flags);
}

size_t __wrap_fread(void *p, size_t size, size_t n, FILE *f)
{
	if (size && n <= SIZE_MAX / size)
		save(p, size * n);
	return __real_fread(p, size, n, f);
}

char *__wrap_fgets(char *s, int n, FILE *f)
{
	if (n > 0)
		save(s, (size_t)n);
	return __real_fgets(s, n, f);
}

char *__wrap_strcpy(char *d, const char *s)
{
	save(d, strlen(s) + 1);
	return __real_strcpy(d, s);
}

char *__wrap_stpcpy(char *d, const char *s)
{
	save(d, strlen(s) + 1);
	return __real_stpcpy(d, s);
}

char *__wrap_strncpy(char *d, const char *s, size_t n)
{
	save(d, n);
	return __real_strncpy(d, s, n);
}

char *__wrap_strcat(char *d, const char *s)
{
	save(d, strlen(d) + strlen(s) + 1);
	return __real_strcat(d, s);
}

char *__wrap_strncat(char *d, const char *s, size_t n)
{
	save(d, strlen(d) + strnlen(s, n) + 1);
	return __real_strncat(d, s, n);
}

void *__wrap_memcpy(void *d, const void *s, size_t n)
{
	save(d, n);
	return __real_memcpy(d, s, n);
}

void *__wrap_memmove(void *d, const void *s, size_t n)
{
	save(d, n);
	return __real_memmove(d, s, n);
}

void *__wrap_memset(void *d, int c, size_t n)
{
	save(d, n);
	return __real_memset(d, c, n);
}

void __wrap_qsort(void *base, size_t n, size_t size, int (*cmp)(const void *, const void *))
{
	if (size && n <= SIZE_MAX / size)
		save(base, n * size);
	__real_qsort(base, n, size, cmp);
}

int __wrap_vsprintf(char *buf, const char *fmt, va_list ap)
{
	va_list probe;
	va_copy(probe, ap);
	int need = __real_vsnprintf(NULL, 0, fmt, probe);
	va_end(probe);
	if (need >= 0)
		save(buf, (size_t)need + 1);
	return __real_vsprintf(buf, fmt, ap);
}

int __wrap_vsnprintf(char *buf, size_t n, const char *fmt, va_list ap)
{
	va_list probe;
	va_copy(probe, ap);
	int need = __real_vsnprintf(NULL, 0, fmt, probe);
	va_end(probe);
	if (need >= 0)
		save(buf, (size_t)need + 1 < n ? (size_t)need + 1 : n);
	return __real_vsnprintf(buf, n, fmt, ap);
}

int __wrap_sprintf(char *buf, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int r = __wrap_vsprintf(buf, fmt, ap);
	va_end(ap);
	return r;
}

int __wrap_snprintf(char *buf, size_t n, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int r = __wrap_vsnprintf(buf, n, fmt, ap);
	va_end(ap);
	return r;
}
