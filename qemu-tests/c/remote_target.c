/*
 * A program with covered heap and globals and 4 threads, for snapshot/restore by pid with
 * cowctl. Started with `cowctl run`; takes commands on stdin:
 *   fill N  -> 4 threads rewrite the globals and the heap blocks with a pattern of N; "ok"
 *   sum     -> "sum HEX": FNV-1a over the globals and every heap block
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define THREADS 4
#define BLOCKS 64
static unsigned char globals[THREADS][32768];
static unsigned char *blocks[THREADS][BLOCKS];
static size_t lens[THREADS][BLOCKS];
static int pattern;

static void *fill(void *arg)
{
	long t = (long)arg;
	for (size_t i = 0; i < sizeof globals[t]; i++)
		globals[t][i] = (unsigned char)(pattern ^ i ^ (size_t)t);
	for (int b = 0; b < BLOCKS; b++) {
		/* Reallocate some blocks so the allocator's state changes too. */
		if ((b + pattern) % 3 == 0) {
			free(blocks[t][b]);
			lens[t][b] = 1000 + (size_t)((b * 7919 + pattern * 31) % 20000);
			blocks[t][b] = malloc(lens[t][b]);
		}
		for (size_t i = 0; i < lens[t][b]; i++)
			blocks[t][b][i] = (unsigned char)(pattern * 3 + i + (size_t)b);
	}
	return NULL;
}

static uint64_t fnv(uint64_t h, const unsigned char *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		h = (h ^ p[i]) * 0x100000001b3ull;
	return h;
}

int main(void)
{
	for (int t = 0; t < THREADS; t++)
		for (int b = 0; b < BLOCKS; b++) {
			lens[t][b] = 4096;
			blocks[t][b] = calloc(1, 4096);
		}
	printf("ready %d\n", (int)getpid());
	fflush(stdout);
	char line[64];
	while (fgets(line, sizeof line, stdin)) {
		if (!strncmp(line, "fill ", 5)) {
			pattern = atoi(line + 5);
			pthread_t th[THREADS];
			for (long t = 0; t < THREADS; t++)
				pthread_create(&th[t], NULL, fill, (void *)t);
			for (int t = 0; t < THREADS; t++)
				pthread_join(th[t], NULL);
			puts("ok");
		} else if (!strncmp(line, "sum", 3)) {
			uint64_t h = 0xcbf29ce484222325ull;
			h = fnv(h, (unsigned char *)globals, sizeof globals);
			for (int t = 0; t < THREADS; t++)
				for (int b = 0; b < BLOCKS; b++)
					h = fnv(h, blocks[t][b], lens[t][b]);
			printf("sum %llx\n", (unsigned long long)h);
		} else if (!strncmp(line, "quit", 4)) {
			break;
		} else {
			puts("error");
		}
		fflush(stdout);
	}
	return 0;
}
