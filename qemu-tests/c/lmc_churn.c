/*
 * Randomized churn for the lmc backend, compiled with cowcc: stores of every width (plain,
 * unaligned, across 128-byte regions), struct copies, memcpy/memmove/memset with constant and
 * variable lengths, atomic read-modify-writes and compare-exchanges, into globals and into
 * memory from cow_map; snapshots, restores to random retained ids and drops. After every
 * restore the covered memory must equal a reference copy taken at that snapshot, byte for
 * byte. References and the random stream live in cow_alloc_uncovered memory (libcow's book,
 * which no backend covers). Usage: lmc_churn STEPS SEED
 */
#include <cow.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define GLOBAL_BYTES (48 * 1024)
#define MAPPED_BYTES (256 * 1024)
#define MAXREFS 12

static unsigned char globals[GLOBAL_BYTES];
struct pair {
	uint64_t a;
	double b;
	char tag[24];
};
static struct pair pairs[64];
static unsigned char *mapped;

struct ref {
	int64_t id;
	unsigned char globals[GLOBAL_BYTES];
	struct pair pairs[64];
	unsigned char mapped[MAPPED_BYTES];
};

static uint64_t *rng;
static uint64_t next(void)
{
	uint64_t x = *rng;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *rng = x;
}

/* A random byte range of one of the covered areas. */
static unsigned char *pick(size_t *len)
{
	size_t max = 1 + next() % 600;
	if (next() & 1) {
		size_t off = next() % GLOBAL_BYTES;
		*len = off + max > GLOBAL_BYTES ? GLOBAL_BYTES - off : max;
		return globals + off;
	}
	size_t off = next() % MAPPED_BYTES;
	*len = off + max > MAPPED_BYTES ? MAPPED_BYTES - off : max;
	return mapped + off;
}

static void write_something(void)
{
	size_t len;
	unsigned char *p = pick(&len);
	switch (next() % 9) {
	case 0: /* byte stores */
		for (size_t i = 0; i < len; i++)
			p[i] = (unsigned char)next();
		break;
	case 1: /* unaligned 8-byte stores (may straddle regions) */
		for (size_t i = 0; i + 8 <= len; i += 7) {
			uint64_t v = next();
			memcpy(p + i, &v, 8);
		}
		break;
	case 2: { /* memcpy with a variable length from the other area */
		size_t n2;
		unsigned char *q = pick(&n2);
		size_t n = len < n2 ? len : n2;
		if (p + n <= q || q + n <= p)
			memcpy(p, q, n);
		break;
	}
	case 3: /* memmove within */
		if (len > 2)
			memmove(p + 1, p, len - 2);
		break;
	case 4: /* memset, variable */
		memset(p, (int)next(), len);
		break;
	case 5: { /* struct copy */
		struct pair v = {next(), (double)next(), "struct copy"};
		pairs[next() % 64] = v;
		break;
	}
	case 6: /* atomics */
		__atomic_fetch_add(&pairs[next() % 64].a, next(), __ATOMIC_SEQ_CST);
		break;
	case 7: {
		uint64_t expected = pairs[next() % 64].a;
		__atomic_compare_exchange_n(&pairs[next() % 64].a, &expected, next(), 0,
					    __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
		break;
	}
	default: /* a 300-byte constant memset across regions */
		if (len >= 300)
			memset(p, 0x5a, 300);
	}
}

static void take(struct ref *r, int64_t id)
{
	r->id = id;
	memcpy(r->globals, globals, GLOBAL_BYTES);
	memcpy(r->pairs, pairs, sizeof pairs);
	memcpy(r->mapped, mapped, MAPPED_BYTES);
}

static int same(const struct ref *r, int step)
{
	const char *what = memcmp(r->globals, globals, GLOBAL_BYTES) ? "globals"
			   : memcmp(r->pairs, pairs, sizeof pairs)     ? "pairs"
			   : memcmp(r->mapped, mapped, MAPPED_BYTES)   ? "mapped memory"
								       : NULL;
	if (what)
		fprintf(stderr, "lmc_churn: step %d: %s differ after restore to %lld\n", step, what,
			(long long)r->id);
	return what == NULL;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: %s STEPS SEED\n", argv[0]);
		return 2;
	}
	int steps = atoi(argv[1]);
	int rc = cow_init("lmc");
	if (rc < 0) {
		fprintf(stderr, "cow_init(lmc): %s\n", cow_strerror(rc));
		return 1;
	}
	rng = cow_alloc_uncovered(sizeof *rng);
	*rng = strtoull(argv[2], NULL, 0) | 1;
	struct ref *refs = cow_alloc_uncovered(sizeof(struct ref) * MAXREFS);
	mapped = cow_map(MAPPED_BYTES);
	if (!rng || !refs || !mapped)
		return 3;
	int nrefs = 0, restores = 0;
	for (int step = 0; step < steps; step++) {
		uint64_t op = next() % 100;
		if (op < 80) {
			write_something();
		} else if (op < 88 || nrefs == 0) {
			if (nrefs == MAXREFS) {
				if (cow_drop(refs[0].id) != 0)
					return 4;
				memmove(&refs[0], &refs[1], sizeof(struct ref) * (MAXREFS - 1));
				nrefs--;
			}
			int64_t id = cow_snapshot();
			if (id < 1)
				return 5;
			take(&refs[nrefs++], id);
		} else if (op < 96) {
			int k = (int)(next() % nrefs);
			if (cow_restore(refs[k].id) != 0)
				return 6;
			restores++;
			if (!same(&refs[k], step))
				return 7;
			nrefs = k + 1; /* newer snapshots are gone */
		} else {
			int k = (int)(next() % nrefs);
			if (cow_drop(refs[k].id) != 0)
				return 8;
			memmove(&refs[k], &refs[k + 1], sizeof(struct ref) * (nrefs - k - 1));
			nrefs--;
		}
	}
	printf("lmc_churn: %d steps, %d restores, zero differences\n", steps, restores);
	return 0;
}
