/*
 * Threads started and signalled while snapshots write-protect memory (cowctl run --backend
 * uffd|mprotect). Two ways the mprotect backend once killed a program, each made likely here:
 *
 * 1. A new thread runs with every signal blocked until glibc's start_thread unblocks them; on
 *    a stack block glibc took from its cache (a joined thread's), write-protected by a
 *    snapshot, its first push was a blocked SIGSEGV. Here every round joins a thread, takes a
 *    snapshot, and starts the next thread on the cached stack.
 * 2. A program's signal handler, delivered while libcow's SIGSEGV handler ran, wrote a
 *    protected page with SIGSEGV blocked. Here a worker writes fresh protected pages while
 *    another thread keeps signalling it, and the handler writes covered memory.
 *
 * 3. Not a way to die but one to lose data if the stacks were told apart badly: blocks that
 *    threads allocate in glibc's per-thread malloc arenas (which also sit above inaccessible
 *    memory), rewritten after a snapshot, come back byte-exact.
 *
 * Every restore is byte-exact, every signal handled once. Prints "thread starts: ok".
 *
 * usage: thread_starts ROUNDS
 */
#include <cow.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "wait_equal.h"

#define PAGES 256

static unsigned char state[PAGES * 4096], ref[PAGES * 4096];
static volatile long handled_in_covered; /* .bss: write-protected at each snapshot */

#define ARENA_THREADS 4
#define BLOCKS 32
static unsigned char *blocks[ARENA_THREADS][BLOCKS];

/* Counters no restore rewinds: a shared mapping is not covered. */
struct counters {
	atomic_long sent, seen;
	atomic_int stop;
	atomic_int arena_ready, arena_go, arena_written;
};
static struct counters *c;

static void fail(const char *what)
{
	fprintf(stderr, "thread starts: FAIL %s\n", what);
	exit(1);
}

static void *writer(void *arg)
{
	long round = (long)arg;
	for (size_t p = 0; p < PAGES; p += 3)
		state[p * 4096 + round % 4096] = (unsigned char)(round + p);
	return NULL;
}

static void on_usr1(int sig)
{
	(void)sig;
	handled_in_covered++;
	atomic_fetch_add(&c->seen, 1);
}

static void *signaller(void *arg)
{
	pthread_t target = *(pthread_t *)arg;
	while (!atomic_load(&c->stop)) {
		if (atomic_load(&c->seen) == atomic_load(&c->sent)) {
			atomic_fetch_add(&c->sent, 1);
			pthread_kill(target, SIGUSR1);
		}
		sched_yield();
	}
	return NULL;
}

static void *page_writer(void *arg)
{
	(void)arg;
	for (unsigned n = 0; !atomic_load(&c->stop); n++)
		for (size_t p = 0; p < PAGES; p++)
			state[p * 4096 + n % 4096] = (unsigned char)n;
	return NULL;
}

static size_t block_size(long t, int b)
{
	return 4096 * (size_t)(1 + (t * BLOCKS + b) % 16) + (size_t)b * 8;
}

static int block_intact(long t, int b)
{
	for (size_t i = 0; i < block_size(t, b); i++)
		if (blocks[t][b][i] != (unsigned char)(t * 31 + b + i))
			return 0;
	return 1;
}

/* Fills blocks of its own arena; after the snapshot (arena_go 1) overwrites them. The waits
 * are on shared memory: a restore must not rewind what the threads wait on. */
static void *arena_worker(void *arg)
{
	long t = (long)arg;
	for (int b = 0; b < BLOCKS; b++) {
		blocks[t][b] = malloc(block_size(t, b));
		if (!blocks[t][b])
			fail("malloc");
		for (size_t i = 0; i < block_size(t, b); i++)
			blocks[t][b][i] = (unsigned char)(t * 31 + b + i);
	}
	atomic_fetch_add(&c->arena_ready, 1);
	while (atomic_load(&c->arena_go) < 1)
		usleep(100);
	for (int b = 0; b < BLOCKS; b++)
		memset(blocks[t][b], 0xee, block_size(t, b));
	atomic_fetch_add(&c->arena_written, 1);
	while (atomic_load(&c->arena_go) < 2)
		usleep(100);
	return NULL;
}

int main(int argc, char **argv)
{
	int rounds = argc > 1 ? atoi(argv[1]) : 200;
	c = mmap(NULL, sizeof *c, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (c == MAP_FAILED)
		fail("mmap");
	alarm(120); /* a hang is a failure */

	/* 1: each thread starts on the stack its predecessor left in glibc's cache. */
	for (long r = 0; r < rounds; r++) {
		pthread_t t;
		if (pthread_create(&t, NULL, writer, (void *)r) != 0 || pthread_join(t, NULL) != 0)
			fail("pthread_create");
		memcpy(ref, state, sizeof state);
		long id = cow_snapshot();
		if (id <= 0)
			fail("cow_snapshot");
		if (pthread_create(&t, NULL, writer, (void *)(r + 1000)) != 0 ||
		    pthread_join(t, NULL) != 0)
			fail("pthread_create after a snapshot");
		int rc = cow_restore(id);
		if (rc != 0) {
			fprintf(stderr, "thread starts: cow_restore: %s\n", cow_strerror(-rc));
			fail("cow_restore");
		}
		if (memcmp(state, ref, sizeof state) != 0)
			fail("a restore was not byte-exact");
		if (cow_drop(id) != 0)
			fail("cow_drop");
	}

	/* 2: signals to a thread that keeps faulting on freshly protected pages. */
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	if (sigaction(SIGUSR1, &sa, NULL) != 0)
		fail("sigaction");
	pthread_t w, s;
	if (pthread_create(&w, NULL, page_writer, NULL) != 0 ||
	    pthread_create(&s, NULL, signaller, &w) != 0)
		fail("pthread_create");
	for (int r = 0; r < rounds; r++) {
		long id = cow_snapshot();
		if (id <= 0 || cow_drop(id) != 0)
			fail("cow_snapshot");
		usleep(200);
	}
	atomic_store(&c->stop, 1);
	pthread_join(s, NULL);
	pthread_join(w, NULL);
	WAIT_EQUAL(&c->seen, &c->sent, "a SIGUSR1 was not handled");
	if (handled_in_covered != atomic_load(&c->seen))
		fail("the handler's writes to covered memory were lost");

	/* 3: blocks in the threads' malloc arenas. */
	pthread_t arena[ARENA_THREADS];
	for (long t = 0; t < ARENA_THREADS; t++)
		if (pthread_create(&arena[t], NULL, arena_worker, (void *)t) != 0)
			fail("pthread_create");
	while (atomic_load(&c->arena_ready) < ARENA_THREADS)
		usleep(100);
	long id = cow_snapshot();
	if (id <= 0)
		fail("cow_snapshot");
	atomic_store(&c->arena_go, 1);
	while (atomic_load(&c->arena_written) < ARENA_THREADS)
		usleep(100);
	int rc = cow_restore(id);
	if (rc != 0) {
		fprintf(stderr, "thread starts: cow_restore: %s\n", cow_strerror(-rc));
		fail("cow_restore (arenas)");
	}
	for (long t = 0; t < ARENA_THREADS; t++)
		for (int b = 0; b < BLOCKS; b++)
			if (!block_intact(t, b))
				fail("a block in a thread's malloc arena was not restored");
	atomic_store(&c->arena_go, 2);
	for (long t = 0; t < ARENA_THREADS; t++)
		pthread_join(arena[t], NULL);
	if (cow_drop(id) != 0)
		fail("cow_drop");
	printf("thread starts: ok (%d rounds, %ld signals handled)\n", rounds, atomic_load(&c->seen));
	return 0;
}
