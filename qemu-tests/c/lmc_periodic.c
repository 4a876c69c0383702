/*
 * Periodic checkpoints of an unmodified program on lmc: run under
 * `cowctl run --backend lmc --every 1 --keep 8`, it never calls libcow while it works (a loop
 * of iterations rewriting a table and a heap block for ~300 ms); the checkpointer's requests
 * are taken at its safe points. Afterwards it looks at the retained checkpoints through cow.h:
 * each must be a consistent cut — the table and the block as they were right after the
 * iteration the checkpoint's own counter says — and a restore to one must bring exactly those
 * bytes back. Prints "lmc_periodic: N checkpoints, consistent".
 */
#include <cow.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define SLOTS 1024

static uint64_t iteration;
static uint64_t table[SLOTS];
static uint64_t *block;

static uint64_t mix(uint64_t x)
{
	x ^= x >> 31;
	x *= 0x7fb5d329728ea185ull;
	x ^= x >> 27;
	return x;
}

/* One iteration: the state after iteration n is a function of n alone. */
static void step(uint64_t n)
{
	table[n % SLOTS] = mix(n);
	block[n % 64] = n;
	iteration = n;
}

/* The table and block as they are right after iteration n. */
static void expected(uint64_t n, uint64_t *t, uint64_t *b)
{
	memset(t, 0, SLOTS * sizeof *t);
	memset(b, 0, 64 * sizeof *b);
	for (uint64_t i = n >= SLOTS ? n - SLOTS + 1 : 1; i <= n; i++)
		t[i % SLOTS] = mix(i);
	for (uint64_t i = n >= 64 ? n - 63 : 1; i <= n; i++)
		b[i % 64] = i;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(void)
{
	block = calloc(64, sizeof *block);
	if (!block)
		return 2;
	double end = now() + 0.3;
	uint64_t n = 0;
	while (now() < end)
		for (int k = 0; k < 1000; k++)
			step(++n);
	int64_t last = cow_snapshot(); /* the newest id: periodic ones are below it */
	if (last < 1) {
		fprintf(stderr, "lmc_periodic: cow_snapshot: %s\n", cow_strerror((int)last));
		return 3;
	}
	/* The checkpointer goes on taking checkpoints (and dropping the oldest beyond --keep)
	 * while this looks at them, so an id may vanish between two reads: it is skipped. */
	static uint64_t t[SLOTS], b[64], got_t[SLOTS], got_b[64];
	int found = 0;
	for (int64_t id = last - 1; id >= 1 && id >= last - 64; id--) {
		uint64_t at;
		if (cow_read(id, &iteration, &at, sizeof at) != 0 ||
		    cow_read(id, table, got_t, sizeof got_t) || cow_read(id, block, got_b, sizeof got_b))
			continue; /* dropped */
		expected(at, t, b);
		if (memcmp(t, got_t, sizeof t) || memcmp(b, got_b, sizeof b)) {
			fprintf(stderr, "lmc_periodic: checkpoint %lld (iteration %llu) is not a consistent cut\n",
				(long long)id, (unsigned long long)at);
			return 1;
		}
		found++;
	}
	if (found < 3) {
		fprintf(stderr, "lmc_periodic: only %d periodic checkpoints retained\n", found);
		return 5;
	}
	/* Restore to the newest periodic checkpoint there is now; if it is dropped between the
	 * look and the restore, look again. */
	for (int attempt = 0; attempt < 1000; attempt++) {
		int64_t mine = cow_snapshot(), id;
		uint64_t at = 0;
		if (mine < 1)
			return 3;
		for (id = mine - 1; id >= 1; id--)
			if (id != last && cow_read(id, &iteration, &at, sizeof at) == 0)
				break;
		cow_drop(mine);
		if (id < 1)
			break;
		int rc = cow_restore(id);
		if (rc == -ENOENT)
			continue;
		if (rc != 0)
			return 6;
		expected(at, t, b);
		if (iteration != at || memcmp(t, table, sizeof t) || memcmp(b, block, sizeof b)) {
			fprintf(stderr, "lmc_periodic: restore to %lld is not exact\n", (long long)id);
			return 1;
		}
		printf("lmc_periodic: %d checkpoints, consistent (%llu iterations)\n", found,
		       (unsigned long long)n);
		return 0;
	}
	fprintf(stderr, "lmc_periodic: no periodic checkpoint to restore\n");
	return 6;
}
