/*
 * Randomized churn of memory a program maps itself, under `cowctl run` on cow.ko: its own pool
 * of private anonymous mappings (mmap, MAP_FIXED over them, munmap, mremap grow/shrink/move,
 * mprotect read-only and back, madvise MADV_DONTNEED/MADV_FREE), blocks from jemalloc's own
 * arenas (Debian's libjemalloc2, linked: mallocx/dallocx, purged at once with MADV_DONTNEED),
 * a global counter of a dlopen'ed shared library, and libc's stdout state (bytes pending in its
 * buffer). Snapshots, restores to random retained ids, drops; after every restore every byte is
 * compared with a reference kept in shared anonymous memory (never covered), mappings made
 * after the snapshot must be gone, mappings removed since must be back, read-only ones must
 * still be read-only. Every 500 steps a fork: parent and child both write, neither sees the
 * other's writes. Exit 0 = zero differences.
 *
 * Usage: preload_mappings STEPS SEED LIBCOUNTER.so
 */
#define _GNU_SOURCE
#include <cow.h>
#include <dlfcn.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdio_ext.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <ucontext.h>
#include <unistd.h>

#define PAGE 4096
#define POOLS 12
#define POOL_MAX (32 * PAGE)
#define JBLOCKS 48
#define JMAX (96 * 1024)
#define MAXREFS 8

struct pool {
	unsigned char *addr;
	size_t len;
	int readonly;
};

/* The program's own state: all of it covered (globals of the executable). */
static struct pool pools[POOLS];
static unsigned char *jblocks[JBLOCKS];
static size_t jlens[JBLOCKS];

/* jemalloc's own API (linked: its initial-exec TLS cannot be dlopen'ed into a process whose
 * static TLS is used up; its `malloc` is libcow_preload's, which comes first). */
void *mallocx(size_t size, int flags);
void dallocx(void *ptr, int flags);
/* Read by jemalloc at its initialisation: purge at once, so its madvise runs while we test. */
const char *malloc_conf = "dirty_decay_ms:0,muzzy_decay_ms:0";
static long *counter; /* the dlopen'ed library's global */

struct ref {
	int64_t id;
	struct pool pools[POOLS];
	unsigned char *jblocks[JBLOCKS];
	size_t jlens[JBLOCKS];
	long counter;
	size_t pending;
	unsigned char *bytes; /* pool bytes, then block bytes */
};

/* The step and operation under way, for a crash report (uncovered). */
static long *trace;

/* The generator's state must not be covered: a restore would replay the same choices. */
static uint64_t *rng_state;
static uint64_t rnd(void)
{
	uint64_t x = *rng_state;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*rng_state = x;
	return x * 0x2545F4914F6CDD1Dull;
}
static size_t below(size_t n) { return n ? rnd() % n : 0; }

/* Memory no backend covers: shared, not private. */
static void *uncovered(size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		perror("mmap shared");
		exit(90);
	}
	return p;
}

static void scribble(unsigned char *b, size_t n)
{
	size_t at = below(n), len = 1 + below(n - at < 3 * PAGE ? n - at : 3 * PAGE);
	for (size_t i = 0; i < len; i++)
		b[at + i] = (unsigned char)rnd();
}

static int mapped(const void *addr, size_t len)
{
	return msync((void *)addr, len, MS_ASYNC) == 0 || errno != ENOMEM;
}

static int any_mapped(const unsigned char *addr, size_t len)
{
	for (size_t off = 0; off < len; off += PAGE)
		if (mapped(addr + off, PAGE))
			return 1;
	return 0;
}

/* Whether the page at `addr` is writable, from /proc/self/maps. */
static int writable(const void *addr)
{
	FILE *f = fopen("/proc/self/maps", "r");
	char line[512];
	int w = -1;
	while (f && fgets(line, sizeof line, f)) {
		unsigned long a, b;
		char perms[8];
		if (sscanf(line, "%lx-%lx %7s", &a, &b, perms) == 3 && (unsigned long)addr >= a &&
		    (unsigned long)addr < b)
			w = perms[1] == 'w';
	}
	if (f)
		fclose(f);
	return w;
}

static void save(struct ref *r, int64_t id)
{
	r->id = id;
	memcpy(r->pools, pools, sizeof pools);
	memcpy(r->jblocks, jblocks, sizeof jblocks);
	memcpy(r->jlens, jlens, sizeof jlens);
	r->counter = *counter;
	r->pending = __fpending(stdout);
	unsigned char *p = r->bytes;
	for (int i = 0; i < POOLS; i++, p += POOL_MAX)
		if (pools[i].addr)
			memcpy(p, pools[i].addr, pools[i].len);
	for (int i = 0; i < JBLOCKS; i++, p += JMAX)
		if (jblocks[i])
			memcpy(p, jblocks[i], jlens[i]);
}

/* Whether the backend is an in-process one (uffd, mprotect) rather than cow.ko. */
static int in_process;

static int check(const struct ref *r, const struct pool *before, int step)
{
#define FAIL(...)                                                                  \
	do {                                                                       \
		fprintf(stderr, "step %d (restore to %lld): ", step, (long long)r->id); \
		fprintf(stderr, __VA_ARGS__);                                      \
		fputc('\n', stderr);                                               \
		return 1;                                                          \
	} while (0)
	if (memcmp(pools, r->pools, sizeof pools))
		FAIL("pool table differs");
	if (memcmp(jblocks, r->jblocks, sizeof jblocks) || memcmp(jlens, r->jlens, sizeof jlens))
		FAIL("jemalloc block table differs");
	if (*counter != r->counter)
		FAIL("shared library counter %ld, expected %ld", *counter, r->counter);
	if (__fpending(stdout) != r->pending)
		FAIL("stdout pending %zu, expected %zu", __fpending(stdout), r->pending);
	const unsigned char *p = r->bytes;
	for (int i = 0; i < POOLS; i++, p += POOL_MAX) {
		if (!pools[i].addr)
			continue;
		if (!mapped(pools[i].addr, pools[i].len))
			FAIL("pool %d (%p) not mapped again", i, pools[i].addr);
		if (memcmp(pools[i].addr, p, pools[i].len))
			FAIL("pool %d bytes differ", i);
		/* (mprotect's tracking shows in /proc/self/maps; no pool is read-only there) */
		if (!in_process && writable(pools[i].addr) != !pools[i].readonly)
			FAIL("pool %d protection not restored", i);
	}
	for (int i = 0; i < JBLOCKS; i++, p += JMAX)
		if (jblocks[i] && memcmp(jblocks[i], p, jlens[i])) {
			size_t j = 0;
			while (jblocks[i][j] == p[j])
				j++;
			FAIL("jemalloc block %d (%p, %zu bytes) differs at %zu: %#x, expected %#x", i,
			     (void *)jblocks[i], jlens[i], j, jblocks[i][j], p[j]);
		}
	/* Pool mappings made after the snapshot, where nothing restored lives now, are gone
	 * under cow.ko; the in-process backends leave them mapped (documented: their owner's
	 * restored bookkeeping no longer knows them). */
	for (int i = 0; !in_process && i < POOLS; i++) {
		const struct pool *b = &before[i];
		if (!b->addr)
			continue;
		int overlaps = 0;
		for (int j = 0; j < POOLS; j++)
			overlaps |= pools[j].addr && b->addr < pools[j].addr + pools[j].len &&
				    pools[j].addr < b->addr + b->len;
		/* Nothing else maps there: jemalloc retains what it maps, so its mappings of
		 * the snapshot never overlap a pool made since. */
		if (!overlaps && any_mapped(b->addr, b->len))
			FAIL("pool mapping %p made after the snapshot survived", b->addr);
	}
	return 0;
}

static void pool_op(int i)
{
	struct pool *p = &pools[i];
	switch (below(8)) {
	case 0: /* map (or remap) */
		if (p->addr)
			munmap(p->addr, p->len);
		p->len = (1 + below(POOL_MAX / PAGE)) * PAGE;
		p->addr = mmap(NULL, p->len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS |
			       (below(2) ? MAP_NORESERVE : 0) | (below(4) ? 0 : MAP_POPULATE), -1, 0);
		if (p->addr == MAP_FAILED) {
			perror("mmap");
			exit(91);
		}
		p->readonly = 0;
		break;
	case 1: /* unmap */
		if (p->addr)
			munmap(p->addr, p->len);
		p->addr = NULL;
		break;
	case 2: /* MAP_FIXED over the tail of it: fresh zeroes */
		if (p->addr && !p->readonly) {
			size_t off = below(p->len / PAGE) * PAGE;
			if (mmap(p->addr + off, p->len - off, PROT_READ | PROT_WRITE,
				 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED)
				exit(92);
		}
		break;
	case 3: { /* mremap: grow, shrink or move */
		if (!p->addr || p->readonly)
			break;
		size_t len = (1 + below(POOL_MAX / PAGE)) * PAGE;
		void *q = mremap(p->addr, p->len, len, MREMAP_MAYMOVE);
		/* uffd and mprotect split a mapping by what they track (documented limit): mremap
		 * across the pieces fails with EFAULT until the next snapshot. */
		if (q == MAP_FAILED && errno == EFAULT && in_process)
			break;
		if (q == MAP_FAILED) {
			perror("mremap");
			exit(93);
		}
		p->addr = q;
		p->len = len;
		break;
	}
	case 4: /* purge some pages */
		if (p->addr && !p->readonly) {
			size_t off = below(p->len / PAGE) * PAGE;
			size_t n = (1 + below((p->len - off) / PAGE)) * PAGE;
			if (madvise(p->addr + off, n, below(2) ? MADV_DONTNEED : MADV_FREE) != 0)
				exit(94);
			if (p->addr[off] != 0 || p->addr[off + n - 1] != 0) {
				fprintf(stderr, "madvise: pages not zero\n");
				exit(95);
			}
		}
		break;
	case 5: /* read-only and back (the in-process backends neither cover read-only memory
		 * nor put protections back: documented limit) */
		if (p->addr && !in_process) {
			p->readonly = !p->readonly;
			mprotect(p->addr, p->len, p->readonly ? PROT_READ : PROT_READ | PROT_WRITE);
		}
		break;
	default: /* writes */
		if (p->addr && !p->readonly)
			scribble(p->addr, p->len);
	}
}

static void jemalloc_op(int i)
{
	if (jblocks[i] && below(3) == 0) {
		if (getenv("COW_DEBUG_REGIONS"))
			fprintf(stderr, "test: block %d freed\n", i);
		dallocx(jblocks[i], 0);
		jblocks[i] = NULL;
		jlens[i] = 0;
	} else if (!jblocks[i]) {
		jlens[i] = 1 + below(JMAX);
		jblocks[i] = mallocx(jlens[i], 0);
		if (getenv("COW_DEBUG_REGIONS"))
			fprintf(stderr, "test: block %d = mallocx(%zu) = %p\n", i, jlens[i], (void *)jblocks[i]);
		if (!jblocks[i])
			exit(96);
		memset(jblocks[i], (int)rnd(), jlens[i]);
	} else {
		scribble(jblocks[i], jlens[i]);
	}
}

/* Sum of everything the program owns. */
static uint64_t digest(void)
{
	uint64_t h = 1469598103934665603ull;
#define MIX(ptr, n)                                            \
	for (size_t k = 0; k < (n); k++)                       \
		h = (h ^ ((const unsigned char *)(ptr))[k]) * 1099511628211ull;
	for (int i = 0; i < POOLS; i++)
		if (pools[i].addr)
			MIX(pools[i].addr, pools[i].len);
	for (int i = 0; i < JBLOCKS; i++)
		if (jblocks[i])
			MIX(jblocks[i], jlens[i]);
	MIX(counter, sizeof *counter);
	return h;
}

/* Parent and child write after the fork; neither sees the other's writes. */
static int fork_check(void)
{
	uint64_t before = digest();
	int go[2];
	if (pipe(go))
		return 1;
	pid_t child = fork();
	if (child < 0)
		return 1;
	if (child == 0) {
		char c;
		if (read(go[0], &c, 1) != 1) /* the parent has written by now */
			_exit(3);
		if (digest() != before) {
			fprintf(stderr, "fork: the child sees the parent's writes\n");
			_exit(4);
		}
		for (int i = 0; i < POOLS; i++)
			if (pools[i].addr && !pools[i].readonly)
				memset(pools[i].addr, 0xC5, pools[i].len);
		(*counter) += 1000;
		_exit(digest() == before ? 5 : 0);
	}
	for (int i = 0; i < JBLOCKS; i++)
		if (jblocks[i])
			jblocks[i][0] ^= 0x5A;
	(*counter)++;
	uint64_t mine = digest();
	if (write(go[1], "x", 1) != 1)
		return 1;
	int status;
	waitpid(child, &status, 0);
	close(go[0]);
	close(go[1]);
	if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
		fprintf(stderr, "fork: child status %#x\n", status);
		return 1;
	}
	if (digest() != mine) {
		fprintf(stderr, "fork: the parent sees the child's writes\n");
		return 1;
	}
	return 0;
}

/* A crash says where: the faulting address, the instruction and the mappings. */
static void on_crash(int sig, siginfo_t *si, void *ctx)
{
	const greg_t *g = ((ucontext_t *)ctx)->uc_mcontext.gregs;
	char line[256];
	const unsigned long long *sp = (const unsigned long long *)g[REG_RSP];
	int n = snprintf(line, sizeof line,
			 "preload_mappings: signal %d at %p, rip %llx, [rsp] %llx %llx %llx, step %ld op %ld\n",
			 sig, si->si_addr, (unsigned long long)g[REG_RIP], sp[0], sp[1], sp[2],
			 trace ? trace[0] : -1, trace ? trace[1] : -1);
	if (write(2, line, n) < 0)
		_exit(98);
	int fd = open("/proc/self/maps", O_RDONLY);
	ssize_t got;
	char buf[4096];
	while (fd >= 0 && (got = read(fd, buf, sizeof buf)) > 0)
		if (write(2, buf, got) < 0)
			break;
	_exit(128 + sig);
}

int main(int argc, char **argv)
{
	static unsigned char altstack[64 * 1024];
	stack_t ss = { .ss_sp = altstack, .ss_size = sizeof altstack };
	sigaltstack(&ss, NULL);
	struct sigaction sa = { .sa_sigaction = on_crash, .sa_flags = SA_SIGINFO | SA_ONSTACK };
	sigaction(SIGSEGV, &sa, NULL);
	sigaction(SIGBUS, &sa, NULL);
	if (argc < 4) {
		fprintf(stderr, "usage: %s STEPS SEED LIBCOUNTER.so\n", argv[0]);
		return 2;
	}
	int steps = atoi(argv[1]);
	void *lib = dlopen(argv[3], RTLD_NOW | RTLD_LOCAL);
	if (!lib) {
		fprintf(stderr, "dlopen: %s\n", dlerror());
		return 2;
	}
	counter = dlsym(lib, "counter");
	if (!counter) {
		fprintf(stderr, "dlsym failed\n");
		return 2;
	}
	int rc = cow_init(NULL);
	if (rc < 0) {
		fprintf(stderr, "cow_init: %s\n", cow_strerror(rc));
		return 2;
	}
	in_process = strcmp(cow_backend(), "kmod") != 0;
	/* stdout fully buffered into /dev/null: its pending bytes are libc state. */
	if (!freopen("/dev/null", "w", stdout))
		return 2;
	setvbuf(stdout, NULL, _IOFBF, 1 << 16);
	rng_state = uncovered(sizeof *rng_state);
	trace = uncovered(2 * sizeof *trace);
	*rng_state = strtoull(argv[2], NULL, 0) | 1;
	struct ref *refs = uncovered(sizeof(struct ref) * MAXREFS);
	size_t ref_bytes = (size_t)POOLS * POOL_MAX + (size_t)JBLOCKS * JMAX;
	for (int i = 0; i < MAXREFS; i++)
		refs[i].bytes = uncovered(ref_bytes);
	int nrefs = 0, restores = 0, forks = 0;
	for (int step = 0; step < steps; step++) {
		int op = (int)below(100);
		trace[0] = step;
		trace[1] = op;
		if (op < 40) {
			pool_op((int)below(POOLS));
		} else if (op < 70) {
			jemalloc_op((int)below(JBLOCKS));
		} else if (op < 75) {
			(*counter) += (long)below(100);
		} else if (op < 78) {
			printf("%llu\n", (unsigned long long)rnd()); /* buffered, not flushed */
		} else if (op < 80) {
			fflush(stdout);
		} else if (op < 88) {
			int64_t id = cow_snapshot();
			if (id < 0) {
				fprintf(stderr, "cow_snapshot: %s\n", cow_strerror((int)id));
				return 1;
			}
			if (nrefs == MAXREFS) {
				cow_drop(refs[0].id);
				unsigned char *b = refs[0].bytes;
				memmove(refs, refs + 1, sizeof(struct ref) * (MAXREFS - 1));
				refs[MAXREFS - 1].bytes = b;
				nrefs--;
			}
			save(&refs[nrefs++], id);
			if (getenv("COW_DEBUG_REGIONS"))
				fprintf(stderr, "test: step %d snapshot %lld\n", step, (long long)id);
		} else if (op < 96 && nrefs) {
			int k = (int)below(nrefs);
			struct pool before[POOLS];
			memcpy(before, pools, sizeof pools);
			if (getenv("COW_DEBUG_REGIONS"))
				fprintf(stderr, "test: step %d restore %lld\n", step, (long long)refs[k].id);
			rc = cow_restore(refs[k].id);
			if (rc < 0) {
				fprintf(stderr, "cow_restore: %s\n", cow_strerror(rc));
				return 1;
			}
			restores++;
			if (check(&refs[k], before, step))
				return 1;
			for (int j = k + 1; j < nrefs; j++) { /* newer ones are gone */
				unsigned char *b = refs[j].bytes;
				refs[j].bytes = refs[nrefs - 1].bytes;
				refs[nrefs - 1].bytes = b;
			}
			nrefs = k + 1;
		}
		if (step % 500 == 499) {
			if (fork_check())
				return 1;
			forks++;
		}
	}
	fprintf(stderr, "preload_mappings: %d steps, %d restores, %d forks, all byte-exact\n", steps,
		restores, forks);
	return restores > steps / 40 ? 0 : 1;
}
