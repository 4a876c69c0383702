/*
 * Threads blocked in condition-variable waits while the main thread takes snapshots and
 * restores (cowctl run --backend uffd|mprotect|fork): on uffd and fork libcow_preload holds such threads without a
 * signal (libcow's idle.rs) and wraps the program's signal handlers, which may run in a held
 * thread. Phase 1: snapshots while workers wait (half with 1 ms timeouts, which return during
 * snapshots), take posted jobs, and have SIGUSR1 (sigaction, SA_SIGINFO) sent to them one by one
 * and SIGUSR2 (signal) to the process, from a thread of their own: every job is done, every
 * signal handled exactly once with its own arguments, nothing hangs. Phase 2: with the workers
 * idle, every restore is byte-exact. Phase 3: a restore rewinds the mutex a held thread
 * sleeps on — woken by a condition variable, it blocks re-locking the mutex the main thread
 * holds (the mutex's word then says "waiters"); the restore rewinds the word to "no waiters",
 * so the main thread's unlock wakes nobody: the restore itself must wake the thread (libcow's
 * Stopped::rewound), or it sleeps forever. Also: sigaction and signal report the program's own
 * handlers. Prints "idle waits: ok".
 *
 * usage: idle_waits ROUNDS
 */
#define _GNU_SOURCE
#include <cow.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "wait_equal.h"

#define WORKERS 4
#define PAGES 64

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int jobs_posted, jobs_done, quit, untimed; /* under mu */
static pthread_t workers[WORKERS];
static unsigned char state[PAGES * 4096], ref[PAGES * 4096];

/* Counters no restore rewinds: a shared mapping is not covered. */
struct counters {
	atomic_int usr1_sent[WORKERS], usr1_seen[WORKERS], usr2_sent, usr2_seen, bad, untimed_ack;
	atomic_int stop_signalling;
	atomic_int relock_go, relock_waiting;
};
static struct counters *c;

static void fail(const char *what)
{
	fprintf(stderr, "idle waits: FAIL %s\n", what);
	exit(1);
}

static void on_usr1(int sig, siginfo_t *info, void *ctx)
{
	if (sig != SIGUSR1 || !info || info->si_signo != SIGUSR1 || !ctx)
		atomic_fetch_add(&c->bad, 1);
	for (int i = 0; i < WORKERS; i++)
		if (pthread_equal(pthread_self(), workers[i]))
			atomic_fetch_add(&c->usr1_seen[i], 1);
}

static void on_usr2(int sig)
{
	if (sig != SIGUSR2)
		atomic_fetch_add(&c->bad, 1);
	atomic_fetch_add(&c->usr2_seen, 1);
}

static void *worker(void *arg)
{
	long i = (long)arg;
	sigset_t usr2;
	sigemptyset(&usr2);
	sigaddset(&usr2, SIGUSR2);
	pthread_sigmask(SIG_UNBLOCK, &usr2, NULL);
	pthread_mutex_lock(&mu);
	while (!quit) {
		if (jobs_done < jobs_posted) {
			jobs_done++;
			pthread_cond_broadcast(&cv);
			continue;
		}
		if (i % 2 && !untimed) {
			struct timespec t;
			clock_gettime(CLOCK_REALTIME, &t);
			t.tv_nsec += 1000000;
			if (t.tv_nsec >= 1000000000)
				t.tv_sec++, t.tv_nsec -= 1000000000;
			pthread_cond_timedwait(&cv, &mu, &t);
		} else {
			pthread_cond_wait(&cv, &mu);
		}
		if (untimed && i % 2)
			atomic_fetch_or(&c->untimed_ack, 1 << i);
	}
	pthread_mutex_unlock(&mu);
	return NULL;
}

/* Phase 3's thread: waits on relock_cv until told to go, then leaves. */
static pthread_mutex_t relock_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t relock_cv = PTHREAD_COND_INITIALIZER;

static void *relocker(void *arg)
{
	(void)arg;
	pthread_mutex_lock(&relock_mu);
	atomic_store(&c->relock_waiting, 1);
	while (!atomic_load(&c->relock_go))
		pthread_cond_wait(&relock_cv, &relock_mu);
	pthread_mutex_unlock(&relock_mu);
	return NULL;
}

/* Phase 3 (see the top). */
static void restore_under_a_relocking_thread(void)
{
	pthread_t t;
	if (pthread_create(&t, NULL, relocker, NULL) != 0)
		fail("pthread_create");
	for (int spins = 0; !atomic_load(&c->relock_waiting); spins++) {
		if (spins > 1000000)
			fail("the relocking thread did not start");
		usleep(10);
	}
	/* It released the mutex in its wait once we hold it. */
	pthread_mutex_lock(&relock_mu);
	long id = cow_snapshot();
	if (id <= 0)
		fail("cow_snapshot");
	atomic_store(&c->relock_go, 1); /* shared memory: no restore rewinds it */
	pthread_cond_signal(&relock_cv);
	/* glibc's mutex word: 2 once the woken thread sleeps waiting for it. */
	for (int spins = 0; __atomic_load_n(&relock_mu.__data.__lock, __ATOMIC_ACQUIRE) != 2;
	     spins++) {
		if (spins > 1000000)
			fail("the woken thread did not wait for the mutex");
		usleep(10);
	}
	usleep(1000); /* asleep in the kernel, not just announced */
	if (cow_restore(id) != 0)
		fail("cow_restore");
	if (cow_drop(id) != 0)
		fail("cow_drop");
	pthread_mutex_unlock(&relock_mu);
	struct timespec deadline;
	clock_gettime(CLOCK_REALTIME, &deadline);
	deadline.tv_sec += 10;
	if (pthread_timedjoin_np(t, NULL, &deadline) != 0)
		fail("a thread held in a wait slept on through the restore of its mutex");
}

/* Sends SIGUSR1 to each worker in turn once it handled the last one, and now and then
 * SIGUSR2 to the process (pending signals of one kind would merge into one). */
static void *signaller(void *arg)
{
	(void)arg;
	for (unsigned n = 0; !atomic_load(&c->stop_signalling); n++) {
		int w = n % WORKERS;
		if (atomic_load(&c->usr1_seen[w]) == atomic_load(&c->usr1_sent[w])) {
			atomic_fetch_add(&c->usr1_sent[w], 1);
			pthread_kill(workers[w], SIGUSR1);
		}
		if (n % 16 == 0 && atomic_load(&c->usr2_seen) == atomic_load(&c->usr2_sent)) {
			atomic_fetch_add(&c->usr2_sent, 1);
			kill(getpid(), SIGUSR2);
		}
		struct timespec t = { 0, 50000 };
		nanosleep(&t, NULL);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	int rounds = argc > 1 ? atoi(argv[1]) : 200;
	c = mmap(NULL, sizeof *c, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (c == MAP_FAILED)
		fail("mmap");
	alarm(120); /* a hang is a failure */

	struct sigaction sa, old;
	memset(&sa, 0, sizeof sa);
	sa.sa_sigaction = on_usr1;
	sa.sa_flags = SA_SIGINFO | SA_RESTART;
	if (sigaction(SIGUSR1, &sa, NULL) != 0 || sigaction(SIGUSR1, NULL, &old) != 0)
		fail("sigaction");
	if (old.sa_sigaction != on_usr1 || !(old.sa_flags & SA_SIGINFO))
		fail("sigaction does not report the program's own SIGUSR1 handler");
	if (signal(SIGUSR2, on_usr2) != SIG_DFL || signal(SIGUSR2, on_usr2) != on_usr2)
		fail("signal does not report the program's own SIGUSR2 handler");

	/* SIGUSR2 goes to a worker: the main thread and the signaller block it. */
	sigset_t usr2;
	sigemptyset(&usr2);
	sigaddset(&usr2, SIGUSR2);
	pthread_sigmask(SIG_BLOCK, &usr2, NULL);
	for (long i = 0; i < WORKERS; i++)
		if (pthread_create(&workers[i], NULL, worker, (void *)i) != 0)
			fail("pthread_create");
	pthread_t sig_thread;
	if (pthread_create(&sig_thread, NULL, signaller, NULL) != 0)
		fail("pthread_create");

	/* Phase 1: snapshots amid jobs, timeouts and signals. */
	for (int r = 0; r < rounds; r++) {
		long id = cow_snapshot();
		if (id <= 0)
			fail("cow_snapshot");
		pthread_mutex_lock(&mu);
		jobs_posted++;
		pthread_cond_signal(&cv);
		pthread_mutex_unlock(&mu);
		if (cow_drop(id) != 0)
			fail("cow_drop");
		pthread_mutex_lock(&mu);
		while (jobs_done < jobs_posted)
			pthread_cond_wait(&cv, &mu);
		pthread_mutex_unlock(&mu);
	}
	atomic_store(&c->stop_signalling, 1);
	pthread_join(sig_thread, NULL);
	for (int w = 0; w < WORKERS; w++)
		WAIT_EQUAL(&c->usr1_seen[w], &c->usr1_sent[w], "a SIGUSR1 was not handled");
	WAIT_EQUAL(&c->usr2_seen, &c->usr2_sent, "a SIGUSR2 was not handled");
	if (atomic_load(&c->bad))
		fail("a handler got the wrong arguments");
	int sent = 0;
	for (int w = 0; w < WORKERS; w++)
		sent += atomic_load(&c->usr1_sent[w]);

	/* Phase 2: every worker in an untimed wait, then restores. */
	pthread_mutex_lock(&mu);
	untimed = 1;
	pthread_cond_broadcast(&cv);
	pthread_mutex_unlock(&mu);
	int timed_mask = 0;
	for (int i = 1; i < WORKERS; i += 2)
		timed_mask |= 1 << i;
	for (int spins = 0; (atomic_load(&c->untimed_ack) & timed_mask) != timed_mask; spins++) {
		if (spins > 1000000)
			fail("workers did not leave their timed waits");
		usleep(10);
	}
	usleep(20000); /* back in their waits */
	unsigned seed = 12345;
	for (int r = 0; r < rounds; r++) {
		for (int k = 0; k < 4; k++) {
			seed = seed * 1103515245 + 12345;
			size_t at = (seed >> 8) % sizeof state;
			state[at] = (unsigned char)(seed >> 3);
		}
		memcpy(ref, state, sizeof state);
		long id = cow_snapshot();
		if (id <= 0)
			fail("cow_snapshot");
		memset(state + (r % PAGES) * 4096, 0xee, 3 * 4096 > sizeof state - (r % PAGES) * 4096 ?
								sizeof state - (r % PAGES) * 4096 :
								3 * 4096);
		if (cow_restore(id) != 0)
			fail("cow_restore");
		if (memcmp(state, ref, sizeof state) != 0)
			fail("a restore was not byte-exact");
		if (cow_drop(id) != 0)
			fail("cow_drop");
	}

	pthread_mutex_lock(&mu);
	quit = 1;
	pthread_cond_broadcast(&cv);
	pthread_mutex_unlock(&mu);
	for (int i = 0; i < WORKERS; i++)
		pthread_join(workers[i], NULL);

	restore_under_a_relocking_thread();
	printf("idle waits: ok (%d rounds, %d SIGUSR1 and %d SIGUSR2 handled, %d jobs)\n", rounds,
	       sent, atomic_load(&c->usr2_seen), jobs_done);
	return 0;
}
