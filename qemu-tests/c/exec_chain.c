/*
 * A program that execs itself N times while `cowctl run --every` checkpoints it: libcow's
 * stop signal, sent to the program's thread at every snapshot (uffd, mprotect; cow.ko with
 * speculation), must never outlive a process image — the new image has no handler for it and
 * its default action ends the process (seen as exit 189, signal 61). Each image writes some
 * heap, then execs the next through execve, execv, execvp, execvpe, fexecve, execveat, execl,
 * execlp and execle in turn, passing its arguments on. The last checks that they arrived and
 * that the stop signal is not left blocked, and prints "exec chain: ok".
 * Usage: exec_chain N [ROUNDS]: each image rewrites 64 KiB of heap ROUNDS times (default 300),
 * the same pages each round, so a speculation policy learns them and pre-copies (cow.ko stops
 * the thread for that).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern char **environ;

/* Whether `sig` is set in the hexadecimal mask of the "SigBlk:" line of /proc/self/status. */
static int blocked_now(int sig)
{
	FILE *f = fopen("/proc/self/status", "r");
	char line[256];
	unsigned long long mask = 0;
	while (f && fgets(line, sizeof line, f))
		if (strncmp(line, "SigBlk:", 7) == 0)
			mask = strtoull(line + 7, NULL, 16);
	if (f)
		fclose(f);
	return (mask >> (sig - 1)) & 1;
}

int main(int argc, char **argv)
{
	int n = argc > 1 ? atoi(argv[1]) : 0;
	const char *rounds_arg = argc > 2 ? argv[2] : "300";
	int rounds = atoi(rounds_arg);
	/* Work the checkpointer can snapshot: the same heap pages rewritten, with pauses. */
	size_t len = 64 << 10;
	char *heap = malloc(len);
	for (int round = 0; round < rounds; round++) {
		memset(heap, round + n, len);
		if (round % 10 == 0)
			usleep(100);
	}
	free(heap);
	if (n == 0) {
		if (argc != 3 || atoi(argv[2]) != rounds) {
			fprintf(stderr, "exec chain: arguments lost on the way (argc %d)\n", argc);
			return 1;
		}
		if (blocked_now(SIGRTMAX - 3)) {
			fprintf(stderr, "exec chain: the stop signal is still blocked\n");
			return 1;
		}
		printf("exec chain: ok\n");
		return 0;
	}
	char next[16];
	snprintf(next, sizeof next, "%d", n - 1);
	char *args[] = {argv[0], next, (char *)rounds_arg, NULL};
	char self[4096];
	ssize_t got = readlink("/proc/self/exe", self, sizeof self - 1);
	if (got < 0) {
		perror("exec chain: readlink");
		return 1;
	}
	self[got] = '\0';
	switch (n % 9) {
	case 0:
		execve(self, args, environ);
		break;
	case 1:
		execv(self, args);
		break;
	case 2:
		execvp(self, args);
		break;
	case 3:
		execvpe(self, args, environ);
		break;
	case 4: {
		int fd = open(self, O_RDONLY | O_CLOEXEC);
		if (fd >= 0)
			fexecve(fd, args, environ);
		break;
	}
	case 5:
		execveat(AT_FDCWD, self, args, environ, 0);
		break;
	case 6:
		execl(self, argv[0], next, rounds_arg, (char *)NULL);
		break;
	case 7:
		execlp(self, argv[0], next, rounds_arg, (char *)NULL);
		break;
	default:
		execle(self, argv[0], next, rounds_arg, (char *)NULL, environ);
		break;
	}
	perror("exec chain: exec");
	return 1;
}
