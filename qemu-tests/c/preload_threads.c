/*
 * Snapshots taken while 4 threads churn the covered heap: every snapshot is a consistent cut of
 * the allocator (cow_snapshot quiesces it), so after a restore to any of them every live block
 * is intact and the allocator keeps working.
 */
#include <cow.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define THREADS 4
#define SLOTS 128

struct block {
	uint32_t thread, seq;
	size_t len;
	unsigned char bytes[];
};

/* A slot is NULL or points at a fully written live block, at every instant: the old block is
 * unlinked before it is freed, the new one published (release) after it is written. A
 * consistent cut therefore never shows a slot pointing at garbage. */
static _Atomic(struct block *) slots[THREADS][SLOTS];
static atomic_int stop;

static unsigned char byte_of(const struct block *b, size_t i)
{
	return (unsigned char)(b->thread * 31 + b->seq * 7 + i);
}

static void *churn(void *arg)
{
	uint32_t t = (uint32_t)(uintptr_t)arg, seq = 0;
	uint64_t x = 0x9E3779B97F4A7C15ull * (t + 1);
	while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
		x ^= x << 13, x ^= x >> 7, x ^= x << 17;
		int s = (int)(x % SLOTS);
		free(atomic_exchange(&slots[t][s], NULL));
		size_t len = 16 + (size_t)(x >> 20) % 6000;
		struct block *b = malloc(sizeof *b + len);
		b->thread = t;
		b->seq = ++seq;
		b->len = len;
		for (size_t i = 0; i < len; i++)
			b->bytes[i] = byte_of(b, i);
		atomic_store_explicit(&slots[t][s], b, memory_order_release);
	}
	return NULL;
}

static int verify(const char *when)
{
	for (int t = 0; t < THREADS; t++)
		for (int s = 0; s < SLOTS; s++) {
			const struct block *b = atomic_load(&slots[t][s]);
			if (!b)
				continue;
			if (b->thread != (uint32_t)t) {
				fprintf(stderr, "%s: slot %d/%d holds thread %u's block\n", when, t, s, b->thread);
				return 1;
			}
			for (size_t i = 0; i < b->len; i++)
				if (b->bytes[i] != byte_of(b, i)) {
					fprintf(stderr, "%s: block %d/%d byte %zu corrupt\n", when, t, s, i);
					return 1;
				}
		}
	return 0;
}

int main(void)
{
	if (cow_init(NULL) < 0)
		return 2;
	pthread_t th[THREADS];
	int64_t ids[40];
	for (int round = 0; round < 3; round++) {
		atomic_store(&stop, 0);
		for (uintptr_t t = 0; t < THREADS; t++)
			pthread_create(&th[t], NULL, churn, (void *)t);
		for (int i = 0; i < 40; i++) {
			usleep(2000);
			ids[i] = cow_snapshot();
			if (ids[i] < 1)
				return 3;
		}
		atomic_store(&stop, 1);
		for (int t = 0; t < THREADS; t++)
			pthread_join(th[t], NULL);
		if (verify("after the threads"))
			return 1;
		/* Back to a snapshot taken mid-churn: blocks and allocator must be coherent. */
		if (cow_restore(ids[20]) != 0)
			return 4;
		if (verify("after restore"))
			return 1;
		/* ids after 20 were discarded by the restore */
		if (cow_drop(ids[20]) != 0)
			return 5;
		for (int i = 19; i >= 0; i--)
			if (cow_drop(ids[i]) != 0)
				return 6;
	}
	puts("threads: 3 rounds, 120 snapshots under churn, restores coherent");
	return 0;
}
