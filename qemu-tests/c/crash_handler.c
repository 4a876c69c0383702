/*
 * A program with its own SIGSEGV handler (as servers install to log a crash), run under
 * `cowctl run --backend B`: its writes to covered memory must never reach that handler (under
 * mprotect every first write after a snapshot faults into libcow's handler first), and a real
 * crash must. Installs the handler with sigaction or signal (argv[1]), takes snapshots while
 * writing the heap and globals, then dereferences NULL. Exit 42 from the handler = right.
 */
#include <cow.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char globals[64 * 4096];

static void on_segv(int sig)
{
	static const char msg[] = "crash_handler: the program's own handler ran\n";
	(void)sig;
	write(2, msg, sizeof msg - 1);
	_exit(42);
}

int main(int argc, char **argv)
{
	if (argc > 1 && strcmp(argv[1], "signal") == 0) {
		signal(SIGSEGV, on_segv);
	} else {
		struct sigaction sa;
		memset(&sa, 0, sizeof sa);
		sa.sa_handler = on_segv;
		sigaction(SIGSEGV, &sa, NULL);
	}
	char *heap = malloc(64 * 4096);
	for (int round = 0; round < 20; round++) {
		if (cow_snapshot() < 0) {
			fprintf(stderr, "crash_handler: cow_snapshot failed\n");
			return 1;
		}
		memset(heap, round, 64 * 4096);
		memset(globals, round, sizeof globals);
	}
	fprintf(stderr, "crash_handler: 20 snapshots, writes fine; now a real crash\n");
	volatile int *null = NULL;
	return *null;
}
