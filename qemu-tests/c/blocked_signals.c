/*
 * A program that does with signals what real programs do, under a checkpointer that needs
 * signals of its own (libcow's stop signal on uffd, mprotect and pre-copying cow.ko; lmc's
 * park signal) or takes SIGSEGV as events (the mprotect backend's first writes, lmc's safe
 * points). The kernel ends a process whose thread faults with SIGSEGV blocked before any
 * handler runs, so libcow keeps SIGSEGV deliverable and shows the program its own masks. Run
 * under `cowctl run --every 1`:
 *
 *   blocked_signals        first resets every signal's action (SIG_IGN, then SIG_DFL, for
 *                          1..NSIG-1, errors ignored: what daemons do); then works (writes
 *                          globals and the heap, loops) for a while in each place SIGSEGV is
 *                          blocked: a thread that blocked every signal, a handler installed
 *                          with a full sa_mask, the program's own SIGSEGV handler (left with
 *                          siglongjmp) — while three threads with every signal blocked wait:
 *                          in read(2), in sigwait(2) for every signal (a program's signal
 *                          thread), reading a signalfd for every signal (started with
 *                          pthread_attr_setsigmask_np). Each thread must still stop or park
 *                          for every checkpoint, the last two must take only the signal the
 *                          program sent them, never libcow's; the masks read back as set
 *                          (SIGSEGV blocked where it blocked it; in its SIGSEGV handler,
 *                          SIGSEGV alone), the bytes as written. Prints "blocked_signals: ok".
 *   blocked_signals crash  blocks SIGSEGV, installs a handler, writes to a read-only page: the
 *                          process ends by SIGSEGV (139), its handler never runs — as without
 *                          libcow.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/signalfd.h>
#include <time.h>
#include <unistd.h>

static uint64_t table[8192];
static uint64_t *heap;
static char *readonly;
static sigjmp_buf back;
static volatile sig_atomic_t usr1_ok, segv_ok;

static int pipefd[2];

/* Waits in read(2), every signal blocked (inherited), until main is done. */
static void *waiter(void *arg)
{
	(void)arg;
	char c;
	return read(pipefd[0], &c, 1) == 1 ? NULL : (void *)1;
}

/* The program's signal thread: waits for every signal; returns what it got. */
static void *signal_thread(void *arg)
{
	(void)arg;
	sigset_t all;
	sigfillset(&all);
	int sig = 0;
	if (sigwait(&all, &sig))
		return (void *)-1L;
	return (void *)(long)sig;
}

/* The same, reading a signalfd for every signal. */
static void *signalfd_thread(void *arg)
{
	(void)arg;
	sigset_t all;
	sigfillset(&all);
	int fd = signalfd(-1, &all, 0);
	struct signalfd_siginfo si;
	if (fd < 0 || read(fd, &si, sizeof si) != sizeof si)
		return (void *)-1L;
	return (void *)(long)si.ssi_signo;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Writes every page of `table` and `heap` for about `seconds` (loops: lmc's safe points). */
static uint64_t work(double seconds, uint64_t seed)
{
	double end = now() + seconds;
	uint64_t n = 0;
	while (now() < end)
		for (int i = 0; i < 8192; i += 64, n++) {
			table[i] = seed + n;
			heap[i] = ~(seed + n);
		}
	return n;
}

static int check(const char *where, uint64_t seed)
{
	for (int i = 0; i < 8192; i += 64)
		if (heap[i] != ~table[i] || table[i] < seed) {
			fprintf(stderr, "blocked_signals: %s: word %d is %#lx / %#lx\n", where, i,
				(unsigned long)table[i], (unsigned long)heap[i]);
			return 1;
		}
	return 0;
}

/* The calling thread's mask as the program reads it: 1 if SIGSEGV is in it, 0 if not; with
 * `only`, -1 if any other signal is. */
static int segv_blocked_now(int only)
{
	sigset_t now;
	pthread_sigmask(SIG_BLOCK, NULL, &now);
	for (int s = 1; only && s <= SIGRTMAX; s++)
		if (s != SIGSEGV && sigismember(&now, s) == 1)
			return -1;
	return sigismember(&now, SIGSEGV);
}

static void on_usr1(int sig)
{
	(void)sig;
	work(0.02, 3000);
	usr1_ok += segv_blocked_now(0) == 1 && check("SIGUSR1 handler", 3000) == 0;
}

static void on_segv(int sig, siginfo_t *info, void *ctx)
{
	(void)sig;
	(void)ctx;
	if ((char *)info->si_addr == readonly) {
		work(0.02, 4000);
		segv_ok += segv_blocked_now(1) == 1 && check("SIGSEGV handler", 4000) == 0;
	}
	siglongjmp(back, 1);
}

static void on_segv_never(int sig)
{
	(void)sig;
	static const char msg[] = "blocked_signals: the handler ran with SIGSEGV blocked\n";
	write(2, msg, sizeof msg - 1);
	_exit(3);
}

int main(int argc, char **argv)
{
	heap = calloc(8192, sizeof *heap);
	readonly = mmap(NULL, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (!heap || readonly == MAP_FAILED)
		return 2;
	work(0.01, 1);

	if (argc > 1 && strcmp(argv[1], "crash") == 0) {
		signal(SIGSEGV, on_segv_never);
		sigset_t segv;
		sigemptyset(&segv);
		sigaddset(&segv, SIGSEGV);
		sigprocmask(SIG_BLOCK, &segv, NULL);
		work(0.05, 2);
		readonly[0] = 1;
		return 0; /* not reached */
	}

	/* 0. Every action reset, as daemons do (libcow's own signals refuse: EINVAL). */
	struct sigaction ign;
	memset(&ign, 0, sizeof ign);
	ign.sa_handler = SIG_IGN;
	for (int s = 1; s < NSIG; s++)
		if (s != SIGKILL && s != SIGSTOP)
			sigaction(s, &ign, NULL);
	for (int s = 1; s < NSIG; s++)
		if (s != SIGKILL && s != SIGSTOP)
			signal(s, SIG_DFL);
	work(0.05, 1);

	/* 1. Every signal blocked (as threads that leave signals to another one do); a thread
	 *    started meanwhile inherits that mask. */
	sigset_t all, before;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &before);
	pthread_t thread, signals;
	if (pipe(pipefd) || pthread_create(&thread, NULL, waiter, NULL) ||
	    pthread_create(&signals, NULL, signal_thread, NULL))
		return 2;
	if (segv_blocked_now(0) != 1) {
		fprintf(stderr, "blocked_signals: sigfillset: SIGSEGV does not read back as blocked\n");
		return 1;
	}
	work(0.3, 1000);
	if (check("all signals blocked", 1000))
		return 1;
	pthread_sigmask(SIG_SETMASK, &before, NULL);
	pthread_attr_t attr;
	pthread_t reader;
	if (pthread_attr_init(&attr) || pthread_attr_setsigmask_np(&attr, &all) ||
	    pthread_create(&reader, &attr, signalfd_thread, NULL))
		return 2;
	if (segv_blocked_now(0) != 0) {
		fprintf(stderr, "blocked_signals: SIGSEGV still reads back as blocked\n");
		return 1;
	}

	/* 2. A handler installed with every signal in its mask. */
	struct sigaction sa, old;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_usr1;
	sigfillset(&sa.sa_mask);
	if (sigaction(SIGUSR1, &sa, NULL) || sigaction(SIGUSR1, NULL, &old) ||
	    sigismember(&old.sa_mask, SIGSEGV) != 1) {
		fprintf(stderr, "blocked_signals: SIGUSR1's mask does not read back as set\n");
		return 1;
	}
	for (int i = 0; i < 10; i++)
		raise(SIGUSR1);
	if (usr1_ok != 10) {
		fprintf(stderr, "blocked_signals: %d of 10 SIGUSR1 handlers saw their mask and bytes\n",
			usr1_ok);
		return 1;
	}

	/* 3. The program's own SIGSEGV handler (SIGSEGV blocked while it runs), left with
	 *    siglongjmp, which restores the mask. */
	memset(&sa, 0, sizeof sa);
	sa.sa_sigaction = on_segv;
	sa.sa_flags = SA_SIGINFO;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGSEGV, &sa, NULL))
		return 1;
	for (int i = 0; i < 10; i++)
		if (sigsetjmp(back, 1) == 0)
			readonly[0] = 1;
	if (segv_ok != 10 || segv_blocked_now(0) != 0) {
		fprintf(stderr, "blocked_signals: %d of 10 SIGSEGV handlers saw their mask (SIGSEGV "
				"alone) and bytes, SIGSEGV blocked after: %d\n", segv_ok,
			segv_blocked_now(0));
		return 1;
	}
	if (check("the end", 4000))
		return 1;
	void *waited = NULL, *got = NULL;
	if (write(pipefd[1], "x", 1) != 1 || pthread_join(thread, &waited) || waited) {
		fprintf(stderr, "blocked_signals: the waiting thread did not end well\n");
		return 1;
	}
	if (pthread_kill(signals, SIGUSR2) || pthread_join(signals, &got) ||
	    (long)got != SIGUSR2) {
		fprintf(stderr, "blocked_signals: the signal thread's sigwait returned %ld, not %d\n",
			(long)got, SIGUSR2);
		return 1;
	}
	if (pthread_kill(reader, SIGUSR1) || pthread_join(reader, &got) || (long)got != SIGUSR1) {
		fprintf(stderr, "blocked_signals: the signalfd thread read %ld, not %d\n", (long)got,
			SIGUSR1);
		return 1;
	}
	printf("blocked_signals: ok\n");
	return 0;
}
