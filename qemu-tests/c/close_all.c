/*
 * A daemon's start: close every descriptor it did not open, then work. Run under
 * `cowctl run --every 1`: libcow's own descriptors (its userfaultfd, /dev/cow, pagemap, control
 * socket) must survive, so that every checkpoint is still taken, while everything of the
 * program's in the range is closed as asked.
 *
 *   close_all loop    close(fd) for every fd from 3 to the descriptor limit (at most 65536)
 *   close_all range   close_range(3, ~0U, 0), then closefrom(3)
 *
 * Then: its own descriptor opened before is closed (EBADF), new ones work (a read of
 * /dev/zero, dup2 onto a free number), and it writes its heap and globals for 0.5 s, checking
 * them at the end. Prints "close_all: ok".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static uint64_t table[8192];

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	const char *how = argc > 1 ? argv[1] : "loop";
	uint64_t *heap = calloc(8192, sizeof *heap);
	int mine = open("/dev/null", O_RDONLY);
	if (!heap || mine < 0)
		return 2;
	if (strcmp(how, "range") == 0) {
		if (close_range(3, ~0U, 0) != 0) {
			perror("close_range");
			return 1;
		}
		closefrom(3);
	} else {
		long max = sysconf(_SC_OPEN_MAX);
		for (long fd = 3; fd < max && fd < 65536; fd++)
			close((int)fd);
	}
	if (fcntl(mine, F_GETFD) != -1 || errno != EBADF) {
		fprintf(stderr, "close_all: %s left the program's descriptor %d open\n", how, mine);
		return 1;
	}
	int zero = open("/dev/zero", O_RDONLY);
	char byte = 1;
	if (zero < 0 || read(zero, &byte, 1) != 1 || byte != 0 || dup2(zero, 200) != 200 ||
	    read(200, &byte, 1) != 1) {
		fprintf(stderr, "close_all: new descriptors do not work\n");
		return 1;
	}
	double end = now() + 0.5;
	uint64_t n = 0;
	while (now() < end)
		for (int i = 0; i < 8192; i += 64, n++) {
			table[i] = n;
			heap[i] = ~n;
		}
	for (int i = 0; i < 8192; i += 64)
		if (heap[i] != ~table[i]) {
			fprintf(stderr, "close_all: word %d differs\n", i);
			return 1;
		}
	printf("close_all: ok (%s)\n", how);
	return 0;
}
