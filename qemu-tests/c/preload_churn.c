/*
 * Randomized heap + globals churn under `cowctl run` (libcow_preload): malloc/calloc/realloc/
 * free/writes, cow_map regions, snapshots, restores to random retained ids, drops. After every
 * restore the program's whole covered state (its global table of live blocks, the blocks'
 * bytes, a global buffer, the mapped regions) is compared byte for byte with a reference kept
 * in shared anonymous memory, which no backend covers (kmod covers /dev/cow memory, uffd and
 * mprotect private mappings). Exit 0 = zero differences.
 */
#define _GNU_SOURCE
#include <cow.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#define SLOTS 256
#define MAXREFS 16
#define MAXREGIONS 4
#define REGION_LEN (64 * 4096)

static unsigned char *blocks[SLOTS];
static size_t lens[SLOTS];
static unsigned char gbuf[3 * 4096 + 123];
static unsigned char *regions[MAXREGIONS];
static int nregions;

struct ref {
	int64_t id;
	unsigned char *mem; /* shared anonymous: blocks, lens, gbuf, regions, then block bytes */
	size_t len;
};

/* The generator's state must not be covered: a restore would replay the same choices. */
static uint64_t *rng_state; /* points into uncovered memory; the pointer itself never changes */
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
static void *anon(size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		perror("mmap");
		exit(90);
	}
	return p;
}

static size_t state_len(void)
{
	size_t n = sizeof blocks + sizeof lens + sizeof gbuf + sizeof regions + sizeof nregions +
		   (size_t)MAXREGIONS * REGION_LEN;
	for (int i = 0; i < SLOTS; i++)
		n += lens[i];
	return n;
}

static void save(struct ref *r, int64_t id)
{
	r->id = id;
	r->len = state_len();
	r->mem = anon(r->len);
	unsigned char *p = r->mem;
	memcpy(p, blocks, sizeof blocks); p += sizeof blocks;
	memcpy(p, lens, sizeof lens); p += sizeof lens;
	memcpy(p, gbuf, sizeof gbuf); p += sizeof gbuf;
	memcpy(p, regions, sizeof regions); p += sizeof regions;
	memcpy(p, &nregions, sizeof nregions); p += sizeof nregions;
	for (int i = 0; i < MAXREGIONS; i++, p += REGION_LEN)
		if (i < nregions)
			memcpy(p, regions[i], REGION_LEN);
	for (int i = 0; i < SLOTS; i++) {
		memcpy(p, blocks[i], lens[i]);
		p += lens[i];
	}
}

static void release(struct ref *r) { munmap(r->mem, r->len); }

static int check(const struct ref *r, int step)
{
	const unsigned char *p = r->mem;
#define CMP(what, ptr, n)                                                                    \
	do {                                                                                 \
		if (memcmp(ptr, p, n)) {                                                     \
			fprintf(stderr, "step %d: %s differs after restore to %lld\n", step, \
				what, (long long)r->id);                                     \
			return 1;                                                            \
		}                                                                            \
		p += (n);                                                                    \
	} while (0)
	CMP("block table", blocks, sizeof blocks);
	CMP("block lengths", lens, sizeof lens);
	CMP("global buffer", gbuf, sizeof gbuf);
	/* Regions mapped after the snapshot stay mapped but read as zero. */
	int saved_nregions;
	const unsigned char *saved_regions = p;
	p += sizeof regions;
	memcpy(&saved_nregions, p, sizeof saved_nregions);
	p += sizeof saved_nregions;
	for (int i = 0; i < nregions; i++, p += REGION_LEN) {
		if (i < saved_nregions) {
			if (memcmp(&regions[i], saved_regions + i * sizeof regions[0], sizeof regions[0]) ||
			    memcmp(regions[i], p, REGION_LEN)) {
				fprintf(stderr, "step %d: region %d differs\n", step, i);
				return 1;
			}
		} else {
			for (size_t j = 0; j < REGION_LEN; j++)
				if (regions[i][j]) {
					fprintf(stderr, "step %d: new region %d not zero\n", step, i);
					return 1;
				}
		}
	}
	p += (size_t)(MAXREGIONS - nregions) * REGION_LEN;
	for (int i = 0; i < SLOTS; i++)
		CMP("block bytes", blocks[i], lens[i]);
	return 0;
}

static int live(void)
{
	int n = 0;
	for (int i = 0; i < SLOTS; i++)
		n += blocks[i] != NULL;
	return n;
}

static void scribble(unsigned char *b, size_t n)
{
	for (size_t i = 0; i < n; i++)
		b[i] = (unsigned char)rnd();
}

/* A crash says where: the faulting address, the instruction and a backtrace (a test that
 * only reports "exit status 139" cannot be diagnosed). */
static void on_crash(int sig, siginfo_t *si, void *ctx)
{
	ucontext_t *uc = ctx;
	char line[256];
	const greg_t *g = uc->uc_mcontext.gregs;
	int n = snprintf(line, sizeof line,
			 "churn: signal %d (code %d) at address %p in thread %ld (main %d): rip %llx rsp %llx rbp %llx\n",
			 sig, si->si_code, si->si_addr, (long)gettid(), getpid(), (unsigned long long)g[REG_RIP],
			 (unsigned long long)g[REG_RSP], (unsigned long long)g[REG_RBP]);
	if (write(2, line, n) < 0)
		_exit(98);
	const unsigned long long *sp = (const unsigned long long *)g[REG_RSP];
	for (int i = 0; i < 24; i++) {
		n = snprintf(line, sizeof line, "  [rsp+%d] %llx\n", 8 * i, sp[i]);
		if (write(2, line, n) < 0)
			_exit(98);
	}
	int fd = open("/proc/self/maps", O_RDONLY);
	ssize_t got;
	char buf[4096];
	while (fd >= 0 && (got = read(fd, buf, sizeof buf)) > 0)
		if (write(2, buf, got) < 0)
			break;
	_exit(128 + sig);
}

static void report_crashes(void)
{
	static unsigned char altstack[64 * 1024];
	stack_t ss = { .ss_sp = altstack, .ss_size = sizeof altstack };
	sigaltstack(&ss, NULL);
	struct sigaction sa = { .sa_sigaction = on_crash, .sa_flags = SA_SIGINFO | SA_ONSTACK };
	sigaction(SIGSEGV, &sa, NULL);
	sigaction(SIGBUS, &sa, NULL);
}

int main(int argc, char **argv)
{
	report_crashes();
	int steps = argc > 1 ? atoi(argv[1]) : 5000;
	int rc = cow_init(NULL);
	if (rc < 0) {
		fprintf(stderr, "cow_init: %s\n", cow_strerror(rc));
		return 2;
	}
	struct ref *refs = anon(sizeof(struct ref) * MAXREFS);
	rng_state = anon(sizeof *rng_state);
	*rng_state = argc > 2 ? strtoull(argv[2], NULL, 0) : 0x243F6A8885A308D3ull;
	int nrefs = 0, restores = 0;
	for (int step = 0; step < steps; step++) {
		size_t r = below(100), s = below(SLOTS);
		if (r < 35) {
			if (lens[s]) {
				size_t off = below(lens[s]), n = 1 + below(lens[s] - off);
				scribble(blocks[s] + off, n < 512 ? n : 512);
			}
		} else if (r < 50) {
			if (!blocks[s]) {
				size_t n = 1 + below(below(10) ? 4096 : 200000);
				if (below(2)) {
					blocks[s] = calloc(1, n);
					for (size_t i = 0; i < n; i++)
						if (blocks[s][i]) {
							fprintf(stderr, "step %d: calloc not zero\n", step);
							return 1;
						}
				} else {
					blocks[s] = malloc(n);
				}
				lens[s] = n;
				scribble(blocks[s], n);
			}
		} else if (r < 60) {
			free(blocks[s]);
			blocks[s] = NULL;
			lens[s] = 0;
		} else if (r < 70) {
			if (blocks[s]) {
				size_t n = 1 + below(below(10) ? 8192 : 100000);
				unsigned char *q = realloc(blocks[s], n);
				if (!q)
					return 3;
				if (n > lens[s])
					scribble(q + lens[s], n - lens[s]);
				blocks[s] = q;
				lens[s] = n;
			}
		} else if (r < 74) {
			size_t off = below(sizeof gbuf);
			scribble(gbuf + off, 1 + below(sizeof gbuf - off));
		} else if (r < 76) {
			if (nregions < MAXREGIONS) {
				regions[nregions] = cow_map(REGION_LEN);
				if (!regions[nregions])
					return 4;
				scribble(regions[nregions] + below(REGION_LEN / 2), 1000);
				nregions++;
			}
		} else if (r < 80) {
			if (nregions) {
				unsigned char *g = regions[below(nregions)];
				scribble(g + below(REGION_LEN - 5000), 1 + below(5000));
			}
		} else if (r < 88) {
			if (nrefs == MAXREFS) {
				if (cow_drop(refs[0].id))
					return 5;
				release(&refs[0]);
				memmove(refs, refs + 1, sizeof(struct ref) * --nrefs);
			}
			int64_t id = cow_snapshot();
			if (id < 1) {
				fprintf(stderr, "cow_snapshot: %s\n", cow_strerror((int)id));
				return 6;
			}
			save(&refs[nrefs++], id);
		} else if (r < 96) {
			if (nrefs) {
				int k = (int)below(nrefs);
				if (cow_restore(refs[k].id)) {
					fprintf(stderr, "cow_restore failed\n");
					return 7;
				}
				restores++;
				if (check(&refs[k], step))
					return 1;
				while (nrefs > k + 1)
					release(&refs[--nrefs]);
			}
		} else {
			if (nrefs > 1) {
				int k = (int)below(nrefs);
				if (cow_drop(refs[k].id))
					return 8;
				release(&refs[k]);
				memmove(refs + k, refs + k + 1, sizeof(struct ref) * (nrefs - k - 1));
				nrefs--;
			}
		}
	}
	printf("churn: %d steps, %d restores, %d live blocks, zero differences\n", steps, restores, live());
	return restores > steps / 40 ? 0 : 9;
}
