/*
 * Randomized memory churn for `cowctl record` fidelity checks: malloc/realloc/free of heap
 * blocks, anonymous mmaps (some replaced in place with MAP_FIXED, some unmapped), madvise
 * (MADV_DONTNEED), read(2) from a pipe into a block (the kernel writing on the program's
 * behalf), regions made read-only after being written, and writes everywhere.
 *
 * After every step the program stores a digest of all of its live state (the slot table, a
 * global buffer, every live block's bytes) next to the step number, with `busy` cleared. A
 * recording is right at checkpoint N if, there, `busy` is 0 and the digest recomputed from
 * the recorded memory equals the recorded digest (see the tests that run this).
 *
 * usage: record_churn SEED STEPS [USLEEP]
 * stderr: "state=ADDR slots=ADDR nslots=N gbuf=ADDR gbuf_len=N", then "final step=S digest=D".
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define NSLOTS 32
#define PAGE 4096

struct slot {
	uint64_t addr; /* 0: empty */
	uint64_t len;
	uint64_t kind; /* 1: malloc, 2: mmap (writable), 3: mmap made read-only */
};

struct state {
	uint64_t step;
	uint64_t busy;
	uint64_t digest;
};

struct state state;
struct slot slots[NSLOTS];
unsigned char gbuf[5 * PAGE + 77];

static uint64_t rng;
static uint64_t rnd(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static uint64_t fnv(uint64_t h, const void *p, size_t n)
{
	const unsigned char *b = p;
	for (size_t i = 0; i < n; i++) {
		h ^= b[i];
		h *= 0x100000001b3ULL;
	}
	return h;
}

/* The digest the tests recompute: the table, gbuf, then each live slot's bytes in order. */
static uint64_t digest(void)
{
	uint64_t h = 0xcbf29ce484222325ULL;
	h = fnv(h, slots, sizeof(slots));
	h = fnv(h, gbuf, sizeof(gbuf));
	for (int i = 0; i < NSLOTS; i++)
		if (slots[i].addr)
			h = fnv(h, (void *)slots[i].addr, slots[i].len);
	return h;
}

static void scribble(unsigned char *p, size_t len)
{
	size_t n = 1 + rnd() % 64;
	for (size_t i = 0; i < n; i++)
		p[rnd() % len] = (unsigned char)rnd();
	if (rnd() % 4 == 0) {
		size_t at = rnd() % len, run = rnd() % (len - at) % (3 * PAGE) + 1;
		memset(p + at, (int)rnd(), run);
	}
}

static void release(struct slot *s)
{
	if (s->kind == 1)
		free((void *)s->addr);
	else
		munmap((void *)s->addr, s->len);
	memset(s, 0, sizeof(*s));
}

static void step(int pipefd[2])
{
	struct slot *s = &slots[rnd() % NSLOTS];
	switch (rnd() % 10) {
	case 0: /* a new heap block (or one freed first) */
		if (s->addr)
			release(s);
		s->len = 1 + rnd() % (3 * PAGE);
		s->addr = (uint64_t)malloc(s->len);
		s->kind = 1;
		memset((void *)s->addr, (int)rnd(), s->len);
		break;
	case 1: /* a new mapping, sometimes in place of an old one (MAP_FIXED) */
		if (s->addr && s->kind != 1 && rnd() % 2) {
			void *p = mmap((void *)s->addr, s->len, PROT_READ | PROT_WRITE,
				       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
			if (p == MAP_FAILED)
				abort();
			s->kind = 2;
			/* Only the first page written: the rest must read as zero again. */
			scribble((void *)s->addr, PAGE);
			break;
		} else {
			if (s->addr)
				release(s);
			s->len = PAGE * (1 + rnd() % 16);
			void *p = mmap(NULL, s->len, PROT_READ | PROT_WRITE,
				       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			if (p == MAP_FAILED)
				abort();
			s->addr = (uint64_t)p;
			s->kind = 2;
		}
		scribble((void *)s->addr, s->len);
		break;
	case 2: /* free or unmap */
		if (s->addr)
			release(s);
		break;
	case 3: /* drop some pages: they read as zero again */
		if (s->addr && s->kind == 2) {
			size_t pages = s->len / PAGE, at = rnd() % pages, n = 1 + rnd() % (pages - at);
			madvise((void *)(s->addr + at * PAGE), n * PAGE, MADV_DONTNEED);
		}
		break;
	case 4: /* the kernel writes into memory on our behalf */
		if (s->addr && s->kind != 3) {
			unsigned char msg[512];
			size_t n = 1 + rnd() % sizeof(msg);
			if (n > s->len)
				n = s->len;
			for (size_t i = 0; i < n; i++)
				msg[i] = (unsigned char)rnd();
			if (write(pipefd[1], msg, n) != (ssize_t)n ||
			    read(pipefd[0], (void *)(s->addr + rnd() % (s->len - n + 1)), n) !=
				    (ssize_t)n)
				abort();
		}
		break;
	case 5: /* written, then made read-only */
		if (s->addr && s->kind == 2) {
			scribble((void *)s->addr, s->len);
			mprotect((void *)s->addr, s->len, PROT_READ);
			s->kind = 3;
		}
		break;
	case 6: /* grow or shrink a heap block */
		if (s->addr && s->kind == 1) {
			size_t len = 1 + rnd() % (4 * PAGE);
			void *p = realloc((void *)s->addr, len);
			if (!p)
				abort();
			if (len > s->len)
				memset((unsigned char *)p + s->len, (int)rnd(), len - s->len);
			s->addr = (uint64_t)p;
			s->len = len;
		}
		break;
	default: /* plain writes */
		if (s->addr && s->kind != 3)
			scribble((void *)s->addr, s->len);
		scribble(gbuf, sizeof(gbuf));
		break;
	}
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: record_churn SEED STEPS [USLEEP]\n");
		return 2;
	}
	rng = strtoull(argv[1], NULL, 0) * 0x9E3779B97F4A7C15ULL + 1;
	long steps = strtol(argv[2], NULL, 0);
	long nap = argc > 3 ? strtol(argv[3], NULL, 0) : 0;
	int pipefd[2];
	if (pipe(pipefd))
		return 1;
	fprintf(stderr, "state=%p slots=%p nslots=%d gbuf=%p gbuf_len=%zu\n", (void *)&state,
		(void *)slots, NSLOTS, (void *)gbuf, sizeof(gbuf));
	for (long i = 0; i < steps; i++) {
		/* The fences keep the compiler from moving writes across the flag: a checkpoint
		 * can stop the program at any instruction. */
		__atomic_store_n(&state.busy, 1, __ATOMIC_SEQ_CST);
		__atomic_signal_fence(__ATOMIC_SEQ_CST);
		step(pipefd);
		state.digest = digest();
		state.step = (uint64_t)i + 1;
		__atomic_signal_fence(__ATOMIC_SEQ_CST);
		__atomic_store_n(&state.busy, 0, __ATOMIC_SEQ_CST);
		if (nap)
			usleep(nap);
	}
	fprintf(stderr, "final step=%lu digest=%lx\n", (unsigned long)state.step,
		(unsigned long)state.digest);
	return 0;
}
