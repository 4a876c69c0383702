/*
 * lmc: libc functions that write the caller's memory without going through instrumented code.
 * cowcc links programs with this object and -Wl,--wrap=NAME for each of these, so the
 * program's own calls (and its references to them, function pointers included) reach
 * __wrap_NAME, which saves the bytes about to be written (__cow_lmc_write: the regions not yet
 * saved in this generation) and calls libc's NAME through __real_NAME. Calls from inside libc
 * or other uninstrumented libraries are not seen (documented).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/select.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

void __cow_lmc_write(void *p, uint64_t n);
void __cow_lmc_exclude(void *p, uint64_t n);
void __cow_lmc_include(void *p, uint64_t n);
void *__real_mmap(void *, size_t, int, int, int, off_t);
int __real_munmap(void *, size_t);
void __real_free(void *);
void *__real_realloc(void *, size_t);
size_t __real_malloc_usable_size(void *);
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

/* libcow's generation and shadow tags (one per region of 2^REGION_SHIFT bytes, 128 unless
 * COW_LMC_REGION_SHIFT was set at build time; see libcow's lmc.rs). */
extern uint16_t __cow_lmc_gen;
extern uint16_t *__cow_lmc_shadow;
#ifndef REGION_SHIFT
#define REGION_SHIFT 7
#endif

/*
 * The ranges this thread's wrapper call saved, until it returns. A checkpoint with several
 * threads may park this thread inside the call — at a system call, which may be the very write
 * (read) — and then saves these ranges again in the new generation (libcow's lmc_cut.rs).
 */
#define MAX_CALL_RANGES 8
static __thread struct {
	uintptr_t range[2 * MAX_CALL_RANGES];
	unsigned n; /* may exceed MAX_CALL_RANGES: then the call cannot be parked in */
} call;

/* Every wrapper starts with CALL_SCOPE: the ranges it saves are forgotten when it returns. */
static void end_call(unsigned *before)
{
	call.n = *before;
}
#define CALL_SCOPE unsigned call_scope __attribute__((cleanup(end_call))) = call.n

/* For libcow, from any context (a signal handler included): this thread's call ranges. */
static size_t call_ranges(uintptr_t *out, size_t cap)
{
	unsigned n = __atomic_load_n(&call.n, __ATOMIC_RELAXED);
	if (n > MAX_CALL_RANGES || n > cap)
		return (size_t)-1;
	for (unsigned i = 0; i < 2 * n; i++)
		out[i] = call.range[i];
	return n;
}

void __cow_lmc_ranges_hook(size_t (*hook)(uintptr_t *, size_t));

__attribute__((constructor)) static void register_call_ranges(void)
{
	__cow_lmc_ranges_hook(call_ranges);
}

/* Whether writes are being saved (a snapshot is held): wrappers that must measure what they
 * will write do so only then. */
static inline int saving(void)
{
	return __atomic_load_n(&__cow_lmc_gen, __ATOMIC_ACQUIRE) != 0;
}

/* Saves [p, p + n) before libc writes it: the slow path only if some region of it is not
 * tagged with the current generation yet (the pass's own inlined check, for ranges). */
static inline void save_now(void *p, size_t n)
{
	uint16_t gen = __atomic_load_n(&__cow_lmc_gen, __ATOMIC_ACQUIRE);
	if (gen == 0 || !p || !n)
		return;
	uint16_t *tags = __atomic_load_n(&__cow_lmc_shadow, __ATOMIC_ACQUIRE);
	if (!tags)
		return;
	uintptr_t first = (uintptr_t)p >> REGION_SHIFT, last = ((uintptr_t)p + n - 1) >> REGION_SHIFT;
	if (last - first < 64) {
		for (uintptr_t r = first; r <= last; r++)
			if (__atomic_load_n(&tags[r], __ATOMIC_RELAXED) != gen)
				goto slow;
		return;
	}
slow:
	__cow_lmc_write(p, n);
}

/* The same for a call a checkpoint may park this thread in (one that blocks in a system call or
 * calls back into the program): the range is remembered until the call returns. */
static void save(void *p, size_t n)
{
	if (!p || !n)
		return;
	if (call.n < MAX_CALL_RANGES) {
		call.range[2 * call.n] = (uintptr_t)p;
		call.range[2 * call.n + 1] = n;
	}
	__atomic_store_n(&call.n, call.n + 1, __ATOMIC_RELAXED);
	save_now(p, n);
}

static void save_iov(const struct iovec *iov, int n)
{
	for (int i = 0; iov && i < n; i++)
		save(iov[i].iov_base, iov[i].iov_len);
}

ssize_t __wrap_read(int fd, void *buf, size_t n)
{
	CALL_SCOPE;
	save(buf, n);
	return __real_read(fd, buf, n);
}

ssize_t __wrap_pread(int fd, void *buf, size_t n, off_t off)
{
	CALL_SCOPE;
	save(buf, n);
	return __real_pread(fd, buf, n, off);
}

ssize_t __wrap_readv(int fd, const struct iovec *iov, int n)
{
	CALL_SCOPE;
	save_iov(iov, n);
	return __real_readv(fd, iov, n);
}

ssize_t __wrap_preadv(int fd, const struct iovec *iov, int n, off_t off)
{
	CALL_SCOPE;
	save_iov(iov, n);
	return __real_preadv(fd, iov, n, off);
}

ssize_t __wrap_recv(int fd, void *buf, size_t n, int flags)
{
	CALL_SCOPE;
	save(buf, n);
	return __real_recv(fd, buf, n, flags);
}

ssize_t __wrap_recvfrom(int fd, void *buf, size_t n, int flags, struct sockaddr *addr,
			socklen_t *len)
{
	CALL_SCOPE;
	save(buf, n);
	if (addr && len) {
		save(addr, *len);
		save(len, sizeof *len);
	}
	return __real_recvfrom(fd, buf, n, flags, addr, len);
}

ssize_t __wrap_recvmsg(int fd, struct msghdr *msg, int flags)
{
	CALL_SCOPE;
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
	CALL_SCOPE;
	if (size && n <= SIZE_MAX / size)
		save(p, size * n);
	return __real_fread(p, size, n, f);
}

char *__wrap_fgets(char *s, int n, FILE *f)
{
	CALL_SCOPE;
	if (n > 0)
		save(s, (size_t)n);
	return __real_fgets(s, n, f);
}

char *__wrap_strcpy(char *d, const char *s)
{
	if (saving())
		save_now(d, strlen(s) + 1);
	return __real_strcpy(d, s);
}

char *__wrap_stpcpy(char *d, const char *s)
{
	if (saving())
		save_now(d, strlen(s) + 1);
	return __real_stpcpy(d, s);
}

char *__wrap_strncpy(char *d, const char *s, size_t n)
{
	save_now(d, n);
	return __real_strncpy(d, s, n);
}

char *__wrap_strcat(char *d, const char *s)
{
	if (saving())
		save_now(d, strlen(d) + strlen(s) + 1);
	return __real_strcat(d, s);
}

char *__wrap_strncat(char *d, const char *s, size_t n)
{
	if (saving())
		save_now(d, strlen(d) + strnlen(s, n) + 1);
	return __real_strncat(d, s, n);
}

void *__wrap_memcpy(void *d, const void *s, size_t n)
{
	save_now(d, n);
	return __real_memcpy(d, s, n);
}

void *__wrap_memmove(void *d, const void *s, size_t n)
{
	save_now(d, n);
	return __real_memmove(d, s, n);
}

void *__wrap_memset(void *d, int c, size_t n)
{
	save_now(d, n);
	return __real_memset(d, c, n);
}

void __wrap_qsort(void *base, size_t n, size_t size, int (*cmp)(const void *, const void *))
{
	CALL_SCOPE;
	if (size && n <= SIZE_MAX / size)
		save(base, n * size);
	__real_qsort(base, n, size, cmp);
}

/* Formatting neither blocks nor calls back: nothing to remember for a parked thread. What it
 * will write is measured only while saving, and not at all when the bound is small. */
int __wrap_vsprintf(char *buf, const char *fmt, va_list ap)
{
	if (saving()) {
		va_list probe;
		va_copy(probe, ap);
		int need = __real_vsnprintf(NULL, 0, fmt, probe);
		va_end(probe);
		if (need >= 0)
			save_now(buf, (size_t)need + 1);
	}
	return __real_vsprintf(buf, fmt, ap);
}

/* A bound up to this many bytes is saved whole rather than measured by formatting twice. */
#define SAVE_WHOLE_BOUND 4096

int __wrap_vsnprintf(char *buf, size_t n, const char *fmt, va_list ap)
{
	if (saving() && n > 0) {
		size_t len = n;
		if (n > SAVE_WHOLE_BOUND) {
			va_list probe;
			va_copy(probe, ap);
			int need = __real_vsnprintf(NULL, 0, fmt, probe);
			va_end(probe);
			len = need < 0 ? 0 : (size_t)need + 1 < n ? (size_t)need + 1 : n;
		}
		save_now(buf, len);
	}
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

/*
 * Shared mappings are not covered (as with every backend): another process sees them, and a
 * restore must not rewind what it wrote.
 */
void *__wrap_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	CALL_SCOPE;
	void *p = __real_mmap(addr, len, prot, flags, fd, off);
	if (p != MAP_FAILED && (flags & MAP_SHARED))
		__cow_lmc_exclude(p, len);
	return p;
}

int __wrap_munmap(void *addr, size_t len)
{
	CALL_SCOPE;
	__cow_lmc_include(addr, len);
	return __real_munmap(addr, len);
}

/*
 * The program's heap. glibc's allocator keeps its metadata where only uninstrumented code
 * writes it, so a restore would leave it disagreeing with the restored program. This one is
 * small and saves every byte it writes first: size classes (16-byte steps up to 512 bytes,
 * powers of two above: power-of-two classes alone doubled a Lua heap's footprint and its cache
 * misses) carved from one MAP_NORESERVE reservation (never unmapped, so a restore never writes into a hole), a free
 * list per class whose links live in the free blocks. Blocks from libc's own allocations
 * (strdup inside libc, fopen, getline) stay glibc's and are handed back to it. The allocator
 * makes no system call between saving and writing (nor calls back into the program), so a
 * checkpoint never parks a thread in between: it saves without remembering ranges.
 */
#define HEAP_BYTES (64ull << 30)
#define SMALL_CLASSES 32 /* 16, 32, ..., 512 bytes */
#define CLASSES 64
#define MAGIC 0xc0c0000000000000ull

/* Saved before every write (so a restore rewinds it with the blocks). */
static struct {
	char *bump;
	void *free[CLASSES];
} heap __attribute__((aligned(1 << REGION_SHIFT)));
/* Never saved, each in a region of its own (a restore must not rewind them): the
 * reservation is permanent, and the lock is nobody's at a snapshot. */
static struct {
	char *base;
	char lock;
} __attribute__((aligned(1 << REGION_SHIFT))) fixed;
#define heap_base fixed.base
#define heap_lock fixed.lock

static void lock(void)
{
	while (__atomic_test_and_set(&heap_lock, __ATOMIC_ACQUIRE))
		;
}

static void unlock(void)
{
	__atomic_clear(&heap_lock, __ATOMIC_RELEASE);
}

static int ours(const void *p)
{
	return heap_base && (const char *)p >= heap_base && (const char *)p < heap_base + HEAP_BYTES;
}

static int class_of(size_t need)
{
	if (need <= 512)
		return (int)((need + 15) / 16) - 1;
	int cls = SMALL_CLASSES;
	while (((size_t)1024 << (cls - SMALL_CLASSES)) < need)
		cls++;
	return cls;
}

static size_t class_bytes(int cls)
{
	return cls < SMALL_CLASSES ? (size_t)(cls + 1) * 16 : (size_t)1024 << (cls - SMALL_CLASSES);
}

/* Header before every user pointer: class | MAGIC, then the block's start. */
static void *carve(size_t size, size_t align)
{
	if (size > (1ull << 34) || align > 4096)
		return NULL;
	size_t need = size + 16 + (align > 16 ? align : 0);
	int cls = class_of(need);
	size_t bytes = class_bytes(cls);
	lock();
	if (!heap_base) {
		void *b = __real_mmap(NULL, HEAP_BYTES, PROT_READ | PROT_WRITE,
				      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		if (b == MAP_FAILED) {
			unlock();
			return NULL;
		}
		heap_base = b;
	}
	if (!heap.bump) {
		save_now(&heap.bump, sizeof heap.bump);
		heap.bump = heap_base;
	}
	char *blk = heap.free[cls];
	if (blk) {
		save_now(&heap.free[cls], sizeof heap.free[cls]);
		heap.free[cls] = *(void **)blk;
	} else {
		/* 16-aligned; larger blocks at their power of two (up to a page) */
		uintptr_t to = bytes >= 4096 ? 4096 : cls < SMALL_CLASSES ? 16 : bytes;
		char *start = (char *)(((uintptr_t)heap.bump + to - 1) & ~(to - 1));
		if (start + bytes > heap_base + HEAP_BYTES) {
			unlock();
			return NULL;
		}
		save_now(&heap.bump, sizeof heap.bump);
		heap.bump = start + bytes;
		blk = start;
	}
	unlock();
	size_t a = align > 16 ? align : 16;
	char *user = (char *)(((uintptr_t)blk + 16 + a - 1) & ~(uintptr_t)(a - 1));
	uint64_t *h = (uint64_t *)(user - 16);
	save_now(h, 16);
	h[0] = MAGIC | (uint64_t)cls;
	h[1] = (uint64_t)(uintptr_t)blk;
	return user;
}

static size_t usable(const void *p)
{
	const uint64_t *h = (const uint64_t *)p - 2;
	size_t bytes = class_bytes((int)(h[0] & 0xff));
	return bytes - (size_t)((const char *)p - (const char *)(uintptr_t)h[1]);
}

void *__wrap_malloc(size_t n)
{
	return carve(n, 16);
}

void __wrap_free(void *p)
{
	if (!p)
		return;
	if (!ours(p)) {
		__real_free(p);
		return;
	}
	const uint64_t *h = (const uint64_t *)p - 2;
	int cls = (int)(h[0] & 0xff);
	void **blk = (void **)(uintptr_t)h[1];
	lock();
	save_now(blk, sizeof *blk);
	*blk = heap.free[cls];
	save_now(&heap.free[cls], sizeof heap.free[cls]);
	heap.free[cls] = blk;
	unlock();
}

void *__wrap_calloc(size_t n, size_t size)
{
	if (size && n > SIZE_MAX / size)
		return NULL;
	void *p = carve(n * size, 16);
	if (p) {
		save_now(p, n * size);
		__real_memset(p, 0, n * size);
	}
	return p;
}

void *__wrap_realloc(void *p, size_t n)
{
	if (!p)
		return carve(n, 16);
	size_t old = ours(p) ? usable(p) : __real_malloc_usable_size(p);
	if (ours(p) && n <= old)
		return p;
	void *q = carve(n, 16);
	if (!q)
		return NULL;
	size_t keep = old < n ? old : n;
	save_now(q, keep);
	__real_memcpy(q, p, keep);
	__wrap_free(p);
	return q;
}

void *__wrap_reallocarray(void *p, size_t n, size_t size)
{
	if (size && n > SIZE_MAX / size)
		return NULL;
	return __wrap_realloc(p, n * size);
}

int __wrap_posix_memalign(void **out, size_t align, size_t n)
{
	if (align < sizeof(void *) || (align & (align - 1)))
		return 22; /* EINVAL */
	void *p = carve(n, align);
	if (!p)
		return 12; /* ENOMEM */
	save_now(out, sizeof *out);
	*out = p;
	return 0;
}

void *__wrap_aligned_alloc(size_t align, size_t n)
{
	return (align & (align - 1)) ? NULL : carve(n, align);
}

void *__wrap_memalign(size_t align, size_t n)
{
	return (align & (align - 1)) ? NULL : carve(n, align);
}

size_t __wrap_malloc_usable_size(void *p)
{
	return !p ? 0 : ours(p) ? usable(p) : __real_malloc_usable_size(p);
}

char *__wrap_strdup(const char *s)
{
	size_t n = strlen(s) + 1;
	char *p = carve(n, 16);
	if (p) {
		save_now(p, n);
		__real_memcpy(p, s, n);
	}
	return p;
}

char *__wrap_strndup(const char *s, size_t max)
{
	size_t n = strnlen(s, max);
	char *p = carve(n + 1, 16);
	if (p) {
		save_now(p, n + 1);
		__real_memcpy(p, s, n);
		p[n] = 0;
	}
	return p;
}

/*
 * Threads: once the program has started one, its own cow_snapshot calls gather every thread
 * at a safe point first (libcow's lmc_cut.rs), as the periodic checkpoints always do.
 */
void __cow_lmc_threads_started(void);
int __real_pthread_create(pthread_t *, const pthread_attr_t *, void *(*)(void *), void *);

int __wrap_pthread_create(pthread_t *t, const pthread_attr_t *attr, void *(*fn)(void *), void *arg)
{
	__cow_lmc_threads_started();
	return __real_pthread_create(t, attr, fn, arg);
}

/*
 * Safe points fault on the poll page while a checkpoint is requested: lmc's SIGSEGV handler
 * takes those and passes every other fault to the action the program set, which libcow keeps
 * for it while its handler is installed (the program's sigaction would otherwise replace it).
 * A fault with SIGSEGV blocked would end the process before any handler ran, so every mask the
 * program hands the kernel has SIGSEGV replaced by libcow's stand-in, and every mask it reads
 * back the reverse (libcow's segv_mask.rs): the program sees its own view. Those masks never
 * block lmc's park signal either: a thread blocked in the kernel must be able to park.
 */
int __real_sigaction(int, const struct sigaction *, struct sigaction *);
void (*__real_signal(int, void (*)(int)))(int);
int __real_sigprocmask(int, const sigset_t *, sigset_t *);
int __real_pthread_sigmask(int, const sigset_t *, sigset_t *);
int __real_sigsuspend(const sigset_t *);
int __real_ppoll(struct pollfd *, nfds_t, const struct timespec *, const sigset_t *);
int __real_pselect(int, fd_set *, fd_set *, fd_set *, const struct timespec *, const sigset_t *);
int __real_epoll_pwait(int, struct epoll_event *, int, int, const sigset_t *);
int __real_epoll_pwait2(int, struct epoll_event *, int, const struct timespec *, const sigset_t *);
int __real_sigwait(const sigset_t *, int *);
int __real_sigwaitinfo(const sigset_t *, siginfo_t *);
int __real_sigtimedwait(const sigset_t *, siginfo_t *, const struct timespec *);
int __real_signalfd(int, const sigset_t *, int);
int __real_pthread_attr_setsigmask_np(pthread_attr_t *, const sigset_t *);
int __cow_lmc_sigsegv_action(const struct sigaction *act, struct sigaction *old);
_Bool __cow_lmc_reserved_signal(int sig);
void __cow_lmc_taken_set(sigset_t *set);
void __cow_lmc_mask_to_kernel(sigset_t *set);
void __cow_lmc_mask_to_program(sigset_t *set);

/* The program's mask `set` as the kernel must see it (a copy in `buf`), or null. */
static const sigset_t *kernel_mask(const sigset_t *set, sigset_t *buf)
{
	if (!set)
		return NULL;
	*buf = *set;
	__cow_lmc_mask_to_kernel(buf);
	return buf;
}

int __wrap_sigaction(int sig, const struct sigaction *act, struct sigaction *old)
{
	if (act && __cow_lmc_reserved_signal(sig)) {
		errno = EINVAL;
		return -1;
	}
	if (sig == SIGSEGV && __cow_lmc_sigsegv_action(act, old))
		return 0;
	struct sigaction copy;
	if (act) {
		copy = *act;
		__cow_lmc_mask_to_kernel(&copy.sa_mask);
		act = &copy;
	}
	int rc = __real_sigaction(sig, act, old);
	if (rc == 0 && old)
		__cow_lmc_mask_to_program(&old->sa_mask);
	return rc;
}

static int set_mask(int (*real)(int, const sigset_t *, sigset_t *), int how, const sigset_t *set,
		    sigset_t *old)
{
	sigset_t buf;
	int rc = real(how, kernel_mask(set, &buf), old);
	if (rc == 0 && old)
		__cow_lmc_mask_to_program(old);
	return rc;
}

int __wrap_sigprocmask(int how, const sigset_t *set, sigset_t *old)
{
	return set_mask(__real_sigprocmask, how, set, old);
}

int __wrap_pthread_sigmask(int how, const sigset_t *set, sigset_t *old)
{
	return set_mask(__real_pthread_sigmask, how, set, old);
}

/* The sigwait family and signalfd never take lmc's park signal: a program's signal thread
 * waiting for every signal would take it for its own. */
static const sigset_t *taken_set(const sigset_t *set, sigset_t *buf)
{
	if (!set)
		return NULL;
	*buf = *set;
	__cow_lmc_taken_set(buf);
	return buf;
}

int __wrap_sigwait(const sigset_t *set, int *sig)
{
	sigset_t buf;
	return __real_sigwait(taken_set(set, &buf), sig);
}

int __wrap_sigwaitinfo(const sigset_t *set, siginfo_t *info)
{
	sigset_t buf;
	return __real_sigwaitinfo(taken_set(set, &buf), info);
}

int __wrap_sigtimedwait(const sigset_t *set, siginfo_t *info, const struct timespec *timeout)
{
	sigset_t buf;
	return __real_sigtimedwait(taken_set(set, &buf), info, timeout);
}

int __wrap_signalfd(int fd, const sigset_t *set, int flags)
{
	sigset_t buf;
	return __real_signalfd(fd, taken_set(set, &buf), flags);
}

int __wrap_pthread_attr_setsigmask_np(pthread_attr_t *attr, const sigset_t *set)
{
	sigset_t buf;
	return __real_pthread_attr_setsigmask_np(attr, kernel_mask(set, &buf));
}

int __wrap_sigsuspend(const sigset_t *set)
{
	sigset_t buf;
	return __real_sigsuspend(kernel_mask(set, &buf));
}

int __wrap_ppoll(struct pollfd *fds, nfds_t n, const struct timespec *timeout, const sigset_t *set)
{
	sigset_t buf;
	return __real_ppoll(fds, n, timeout, kernel_mask(set, &buf));
}

int __wrap_pselect(int n, fd_set *r, fd_set *w, fd_set *e, const struct timespec *timeout,
		   const sigset_t *set)
{
	sigset_t buf;
	return __real_pselect(n, r, w, e, timeout, kernel_mask(set, &buf));
}

int __wrap_epoll_pwait(int epfd, struct epoll_event *events, int max, int timeout,
		       const sigset_t *set)
{
	sigset_t buf;
	return __real_epoll_pwait(epfd, events, max, timeout, kernel_mask(set, &buf));
}

int __wrap_epoll_pwait2(int epfd, struct epoll_event *events, int max,
			const struct timespec *timeout, const sigset_t *set)
{
	sigset_t buf;
	return __real_epoll_pwait2(epfd, events, max, timeout, kernel_mask(set, &buf));
}

void (*__wrap_signal(int sig, void (*handler)(int)))(int)
{
	if (__cow_lmc_reserved_signal(sig)) {
		errno = EINVAL;
		return SIG_ERR;
	}
	if (sig != SIGSEGV)
		return __real_signal(sig, handler);
	/* glibc's signal(): BSD semantics. */
	struct sigaction act = { .sa_handler = handler, .sa_flags = SA_RESTART }, old;
	sigemptyset(&act.sa_mask);
	if (__wrap_sigaction(sig, &act, &old) != 0)
		return SIG_ERR;
	return old.sa_handler;
}
