/*
 * fork() under `cowctl run`: parent and child never see each other's writes to the heap or to
 * globals, even while another parent thread keeps writing during the fork.
 */
#include <cow.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define N (1 << 20)
static unsigned char gdata[65536];
static unsigned char *heap;
static unsigned char *busy;
static atomic_int stop;

static void *writer(void *arg)
{
	(void)arg;
	unsigned char v = 0;
	while (!atomic_load(&stop))
		memset(busy, ++v, 4096 * 16);
	return NULL;
}

static int all(const unsigned char *p, size_t n, unsigned char v)
{
	for (size_t i = 0; i < n; i++)
		if (p[i] != v)
			return 0;
	return 1;
}

int main(void)
{
	if (cow_init(NULL) < 0)
		return 2;
	heap = malloc(N);
	busy = malloc(4096 * 16);
	memset(busy, 0, 4096 * 16);
	pthread_t t;
	pthread_create(&t, NULL, writer, NULL);
	for (int round = 0; round < 10; round++) {
		unsigned char a = (unsigned char)(2 * round + 1);
		memset(heap, a, N);
		memset(gdata, a, sizeof gdata);
		pid_t pid = fork();
		if (pid < 0)
			return 3;
		if (pid == 0) {
			if (!all(heap, N, a) || !all(gdata, sizeof gdata, a))
				_exit(10); /* the child must see the memory as at the fork */
			unsigned char b = (unsigned char)(a + 100);
			memset(heap, b, N);
			memset(gdata, b, sizeof gdata);
			char *fresh = malloc(100000); /* the allocator works in the child */
			if (!fresh)
				_exit(11);
			memset(fresh, 1, 100000);
			free(fresh);
			usleep(20000); /* give the parent time to write */
			if (!all(heap, N, b) || !all(gdata, sizeof gdata, b))
				_exit(12); /* the parent's writes leaked into the child */
			if (cow_snapshot() >= 0)
				_exit(13); /* the child must not drive the parent's space */
			_exit(0);
		}
		unsigned char c = (unsigned char)(a + 50);
		memset(heap, c, N);
		memset(gdata, c, sizeof gdata);
		int status;
		waitpid(pid, &status, 0);
		if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
			fprintf(stderr, "round %d: child failed with %d\n", round, WEXITSTATUS(status));
			return 1;
		}
		if (!all(heap, N, c) || !all(gdata, sizeof gdata, c)) {
			fprintf(stderr, "round %d: the child's writes leaked into the parent\n", round);
			return 1;
		}
	}
	atomic_store(&stop, 1);
	pthread_join(t, NULL);
	/* Snapshots still work in the parent after forks. */
	int64_t id = cow_snapshot();
	memset(heap, 7, N);
	if (id < 1 || cow_restore(id) != 0 || !all(heap, N, 19 + 50))
		return 4;
	puts("fork: 10 rounds, no writes crossed");
	return 0;
}
