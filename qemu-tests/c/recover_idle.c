/*
 * Checkpoints taken before an event-loop wait blocks (cowctl run --recover on uffd: libcow
 * takes the next iteration's checkpoint while the loop would be idle, and keeps it when the
 * wait returns only if no other thread ran meanwhile). Each round the main thread writes
 * `before`, then blocks in its wait (epoll_wait, poll and ppoll in turn) until
 *   - a quiet round: a timerfd expires — no thread of ours runs while it waits (the worker
 *     sleeps in a condition-variable wait), so the checkpoint taken before blocking holds;
 *   - a busy round: the worker, woken just before, writes `worker_wrote` while the main thread
 *     waits, then the pipe — the checkpoint taken before blocking no longer holds;
 * and the iteration the wait's return begins writes `during` and `before`, then crashes. After
 * the rollback (the wait fails with EINTR) `before` and `during` must be as when the wait was
 * entered, and in busy rounds `worker_wrote` as the worker left it: a rollback to a checkpoint
 * taken before the worker ran would undo its write. Prints "recover idle: ok".
 *
 * usage: recover_idle ROUNDS (under cowctl run --recover --recover-limit LARGE: every round
 * crashes at the same instruction)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define PAGES 16

/* Covered memory: a rollback rewinds it. */
static unsigned char before[PAGES * 4096], during[PAGES * 4096];
static volatile long worker_wrote;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int pipe_fds[2];

/* Not covered (shared): survives a rollback. */
struct shared {
	volatile int round, crashed, busy, quit;
	volatile long worker_wrote;
};
static struct shared *sh;

static void fail(const char *what)
{
	fprintf(stderr, "recover idle: FAIL %s (round %d)\n", what, sh ? sh->round : -1);
	exit(1);
}

static void sleep_ms(int ms)
{
	struct timespec t = { 0, ms * 1000000L };
	nanosleep(&t, NULL);
}

/* Idle in a condition-variable wait (held by snapshots without a signal); woken in a busy
 * round, it writes covered memory while the main thread waits, then the pipe. */
static void *worker(void *arg)
{
	(void)arg;
	pthread_mutex_lock(&mu);
	int served = -1;
	while (!sh->quit) {
		if (sh->busy && served != sh->round) {
			served = sh->round;
			pthread_mutex_unlock(&mu);
			sleep_ms(20); /* the main thread is blocked in its wait by now */
			worker_wrote = 1000 + served;
			sh->worker_wrote = worker_wrote;
			if (write(pipe_fds[1], "w", 1) != 1)
				fail("write");
			pthread_mutex_lock(&mu);
			continue;
		}
		pthread_cond_wait(&cv, &mu);
	}
	pthread_mutex_unlock(&mu);
	return NULL;
}

/* Blocks until `fd` is readable, with the call of this round. */
static int wait_readable(int epfd, int fd, int round)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };
	struct epoll_event ev;
	struct timespec ten_s = { 10, 0 };
	switch (round % 3) {
	case 0:
		return epoll_wait(epfd, &ev, 1, 10000);
	case 1:
		return poll(&p, 1, 10000);
	default:
		return ppoll(&p, 1, &ten_s, NULL);
	}
}

int main(int argc, char **argv)
{
	int rounds = argc > 1 ? atoi(argv[1]) : 30;
	sh = mmap(NULL, sizeof *sh, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (sh == MAP_FAILED)
		fail("mmap");
	alarm(120); /* a hang is a failure */
	int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC);
	if (tfd < 0 || pipe(pipe_fds) != 0)
		fail("timerfd or pipe");
	/* One epoll set per source: the round's wait names only its own. */
	int ep[2];
	int src[2] = { tfd, pipe_fds[0] };
	for (int i = 0; i < 2; i++) {
		struct epoll_event ev = { .events = EPOLLIN, .data.fd = src[i] };
		ep[i] = epoll_create1(EPOLL_CLOEXEC);
		if (ep[i] < 0 || epoll_ctl(ep[i], EPOLL_CTL_ADD, src[i], &ev) != 0)
			fail("epoll");
	}
	pthread_t t;
	if (pthread_create(&t, NULL, worker, NULL) != 0)
		fail("pthread_create");

	for (;;) {
		int round = sh->round;
		if (round >= rounds)
			break;
		int busy = round % 2;
		/* Written before the wait: what a rollback must bring back. */
		memset(before, round & 0xff, sizeof before);
		memset(during, 0x11, sizeof during);
		if (sh->crashed != round + 1) {
			if (busy) {
				pthread_mutex_lock(&mu);
				sh->busy = 1;
				pthread_cond_signal(&cv);
				pthread_mutex_unlock(&mu);
			} else {
				struct itimerspec at = { .it_value = { 0, 20000000 } };
				if (timerfd_settime(tfd, 0, &at, NULL) != 0)
					fail("timerfd_settime");
			}
		}
		int fd = src[busy];
		int n = wait_readable(ep[busy], fd, round);
		if (n < 0 && errno == EINTR && sh->crashed == round + 1) {
			/* Rolled back: memory as when the wait was entered, with what the worker
			 * wrote before the iteration began. */
			for (size_t i = 0; i < sizeof before; i++)
				if (before[i] != (unsigned char)(round & 0xff) || during[i] != 0x11)
					fail("the rollback did not bring back the memory of the wait's entry");
			if (busy && worker_wrote != sh->worker_wrote)
				fail("the rollback undid what another thread wrote while the loop waited");
			unsigned long long drained;
			if (read(fd, &drained, busy ? 1 : sizeof drained) <= 0)
				fail("read");
			pthread_mutex_lock(&mu);
			sh->busy = 0;
			pthread_mutex_unlock(&mu);
			sh->round = round + 1;
			continue;
		}
		if (n != 1)
			fail("the wait did not return its descriptor");
		/* The iteration: writes, then crashes before reading. */
		memset(during, 0x22, sizeof during);
		before[7] = 0xee;
		sh->crashed = round + 1;
		*(volatile int *)0 = 1;
	}
	pthread_mutex_lock(&mu);
	sh->quit = 1;
	pthread_cond_signal(&cv);
	pthread_mutex_unlock(&mu);
	pthread_join(t, NULL);
	printf("recover idle: ok (%d rounds)\n", rounds);
	return 0;
}
