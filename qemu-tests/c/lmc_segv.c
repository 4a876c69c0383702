/*
 * lmc's safe points fault on purpose (a checkpoint request makes their poll page
 * inaccessible); the program's own SIGSEGV handling must not notice. Compiled with cowcc and
 * run under `cowctl run --backend lmc --every 1`, so that requests come while it works:
 *
 *   lmc_segv handled   a handler set with sigaction (SA_SIGINFO) and then one set with
 *                      signal() each catch 20 faults of the program's own (a write to a
 *                      read-only page) and leave with siglongjmp, while the loop around them
 *                      keeps reaching safe points; sigaction(SIGSEGV, NULL, &old) reports the
 *                      program's handler, not libcow's. Prints "lmc_segv: 40 faults handled".
 *   lmc_segv crash     no handler: the same write ends the process by SIGSEGV, as it would
 *                      without lmc.
 */
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static sigjmp_buf back;
static volatile sig_atomic_t caught;
static volatile uintptr_t fault_addr;
static char *readonly;
static uint64_t table[4096];

static void on_segv_info(int sig, siginfo_t *info, void *ctx)
{
	(void)sig;
	(void)ctx;
	fault_addr = (uintptr_t)info->si_addr;
	caught++;
	siglongjmp(back, 1);
}

static void on_segv_plain(int sig)
{
	(void)sig;
	caught++;
	siglongjmp(back, 1);
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Work with safe points (loop back-edges) for about `seconds`. */
static void work(double seconds)
{
	double end = now() + seconds;
	uint64_t n = 0;
	while (now() < end)
		for (int i = 0; i < 1000; i++, n++)
			table[n % 4096] = n * 0x9e3779b97f4a7c15ull;
}

/* 20 faults of the program's own, each caught by the handler in place. */
static int provoke(const char *how)
{
	int before = caught;
	for (int i = 0; i < 20; i++) {
		work(0.01);
		if (sigsetjmp(back, 1) == 0) {
			readonly[i] = 1; /* faults: the page is PROT_READ */
			fprintf(stderr, "lmc_segv: %s: the write to a read-only page did not fault\n", how);
			return 1;
		}
	}
	if (caught - before != 20) {
		fprintf(stderr, "lmc_segv: %s: %d faults caught, not 20\n", how, caught - before);
		return 1;
	}
	return 0;
}

int main(int argc, char **argv)
{
	readonly = mmap(NULL, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (readonly == MAP_FAILED)
		return 2;
	if (argc > 1 && strcmp(argv[1], "crash") == 0) {
		work(0.05);
		readonly[0] = 1;
		return 0; /* not reached */
	}

	struct sigaction sa, old;
	memset(&sa, 0, sizeof sa);
	sa.sa_sigaction = on_segv_info;
	sa.sa_flags = SA_SIGINFO;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGSEGV, &sa, NULL) != 0 || sigaction(SIGSEGV, NULL, &old) != 0) {
		perror("sigaction");
		return 1;
	}
	if (old.sa_sigaction != on_segv_info) {
		fprintf(stderr, "lmc_segv: sigaction reports another handler than the program's\n");
		return 1;
	}
	if (provoke("sigaction"))
		return 1;
	if (fault_addr < (uintptr_t)readonly || fault_addr >= (uintptr_t)readonly + 4096) {
		fprintf(stderr, "lmc_segv: si_addr %#lx is not the read-only page\n",
			(unsigned long)fault_addr);
		return 1;
	}
	if (signal(SIGSEGV, on_segv_plain) != (void (*)(int))on_segv_info) {
		fprintf(stderr, "lmc_segv: signal() did not return the previous handler\n");
		return 1;
	}
	if (provoke("signal"))
		return 1;
	printf("lmc_segv: %d faults handled\n", caught);
	return 0;
}
