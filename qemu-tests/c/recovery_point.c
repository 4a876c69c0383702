/*
 * cow_recovery_point() from C, OSIRIS-style: a loop whose iteration 5 writes -1 over part of a
 * global table and of a heap table, then dereferences NULL. The crash is rolled back to the
 * recovery point at the top of that iteration (cow_recovery_point returns 1 there), both tables
 * are exactly as the iteration found them, and the loop finishes with every other iteration's
 * work in place. Exit 0 = right. Usage: recovery_point BACKEND
 */
#include <stdio.h>
#include <stdlib.h>
#include "cow.h"

#define N 1024

static long table[N];
static volatile long *nowhere;

static int exact(const long *heap, int done)
{
	/* Iterations 0..done-1 each added their number to entries [i*8, i*8+8). */
	for (int j = 0; j < N; j++) {
		long want = j + (j / 8 < done ? j / 8 : 0);
		if (table[j] != want || heap[j] != want) {
			fprintf(stderr, "recovery_point: entry %d is %ld/%ld, want %ld\n", j, table[j],
				heap[j], want);
			return 0;
		}
	}
	return 1;
}

int main(int argc, char **argv)
{
	int rc = cow_init(argc > 1 ? argv[1] : NULL);
	if (rc < 0) {
		fprintf(stderr, "cow_init: %s\n", cow_strerror(rc));
		return 2;
	}
	if (cow_recovery_enable(3) < 0)
		return 3;
	long *heap = malloc(N * sizeof *heap);
	for (int j = 0; j < N; j++)
		table[j] = heap[j] = j;
	int recovered = 0;
	for (int i = 0; i < 20; i++) {
		int r = cow_recovery_point();
		if (r == 1) {
			recovered++;
			if (!exact(heap, i))
				return 4;
		}
		if (r == 0 && i == 5) {
			for (int j = 0; j < 16; j++)
				table[j] = heap[j] = -1;
			*nowhere = 1;
		}
		for (int j = i * 8; j < i * 8 + 8; j++) {
			table[j] += i;
			heap[j] += i;
		}
	}
	if (!exact(heap, 20))
		return 5;
	printf("recovery_point: %d recovery, state exact\n", recovered);
	return recovered == 1 ? 0 : 6;
}
