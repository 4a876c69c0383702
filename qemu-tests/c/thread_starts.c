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

#define PAGES 256

static unsigned char state[PAGES * 4096], ref[PAGES * 4096];
static volatile long handled_in_covered; /* .bss: write-protected at each snapshot */

/* Counters no restore rewinds: a shared mapping is not covered. */
struct counters {
	atomic_long sent, seen;
	atomic_int stop;
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
	for (int spins = 0; atomic_load(&c->seen) != atomic_load(&c->sent); spins++) {
		if (spins > 1000000)
			fail("a SIGUSR1 was not handled");
		usleep(10);
	}
	if (handled_in_covered != atomic_load(&c->seen))
		fail("the handler's writes to covered memory were lost");
	printf("thread starts: ok (%d rounds, %ld signals handled)\n", rounds, atomic_load(&c->seen));
	return 0;
}
