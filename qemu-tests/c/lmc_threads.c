/*
 * Consistent cuts of a multi-threaded program on lmc, under
 * `cowctl run --backend lmc --every 1 --keep 8`. For ~300 ms:
 * - WORKERS threads each rewrite their pair (a[i], b[i]) = (n, n) in a loop (no safe point
 *   between the two stores: a cut that caught a thread between them would see a[i] != b[i]);
 * - a reader thread is blocked in read(2) on a pipe most of the time, into a global buffer,
 *   and copies the message's number into `got` right after each read (so at any safe point
 *   buf[0] == got; a cut that let the kernel's write into buf land unsaved in the next
 *   generation would show buf[0] == got + 1);
 * - the main thread writes a numbered 64-byte message into the pipe every 200 µs (nanosleep:
 *   it is in the kernel most of the time too).
 * Then, single-threaded again, it reads every retained periodic checkpoint through cow.h and
 * checks both invariants, restores the oldest one still retained and checks them on live
 * memory. Prints "lmc_threads: N checkpoints, consistent cuts".
 */
#include <cow.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define WORKERS 3

static uint64_t a[WORKERS], b[WORKERS];
static uint64_t buf[8], got;
static volatile int stop;
static int pipefd[2];

static void *worker(void *arg)
{
	int i = (int)(intptr_t)arg;
	for (uint64_t n = 1; !stop; n++) {
		a[i] = n;
		b[i] = n;
	}
	return NULL;
}

static void *reader(void *arg)
{
	(void)arg;
	while (read(pipefd[0], buf, sizeof buf) == (ssize_t)sizeof buf)
		got = buf[0];
	return NULL;
}

static int consistent(const uint64_t *aa, const uint64_t *bb, const uint64_t *bf, uint64_t g)
{
	for (int i = 0; i < WORKERS; i++)
		if (aa[i] != bb[i])
			return 0;
	return bf[0] == g;
}

int main(void)
{
	if (pipe(pipefd))
		return 2;
	pthread_t t[WORKERS + 1];
	for (int i = 0; i < WORKERS; i++)
		pthread_create(&t[i], NULL, worker, (void *)(intptr_t)i);
	pthread_create(&t[WORKERS], NULL, reader, NULL);
	struct timespec nap = {0, 200000}, now, end;
	clock_gettime(CLOCK_MONOTONIC, &end);
	end.tv_nsec += 300000000;
	if (end.tv_nsec >= 1000000000) {
		end.tv_sec++;
		end.tv_nsec -= 1000000000;
	}
	uint64_t msg[8] = {0};
	do {
		msg[0]++;
		if (write(pipefd[1], msg, sizeof msg) != (ssize_t)sizeof msg)
			return 2;
		nanosleep(&nap, NULL);
		clock_gettime(CLOCK_MONOTONIC, &now);
	} while (now.tv_sec < end.tv_sec || (now.tv_sec == end.tv_sec && now.tv_nsec < end.tv_nsec));
	stop = 1;
	close(pipefd[1]);
	for (int i = 0; i <= WORKERS; i++)
		pthread_join(t[i], NULL);

	int64_t last = cow_snapshot();
	if (last < 1) {
		fprintf(stderr, "lmc_threads: cow_snapshot: %s\n", cow_strerror((int)last));
		return 3;
	}
	int found = 0;
	int64_t oldest = 0;
	for (int64_t id = last - 1; id >= 1 && id >= last - 64; id--) {
		uint64_t aa[WORKERS], bb[WORKERS], bf[8], g;
		if (cow_read(id, a, aa, sizeof aa) || cow_read(id, b, bb, sizeof bb) ||
		    cow_read(id, buf, bf, sizeof bf) || cow_read(id, &got, &g, sizeof g))
			continue; /* dropped meanwhile */
		if (!consistent(aa, bb, bf, g)) {
			fprintf(stderr, "lmc_threads: checkpoint %lld is not a consistent cut:", (long long)id);
			for (int i = 0; i < WORKERS; i++)
				fprintf(stderr, " a=%llu b=%llu", (unsigned long long)aa[i], (unsigned long long)bb[i]);
			fprintf(stderr, " buf=%llu got=%llu\n", (unsigned long long)bf[0], (unsigned long long)g);
			return 1;
		}
		found++;
		oldest = id;
	}
	if (found < 3) {
		fprintf(stderr, "lmc_threads: only %d periodic checkpoints retained\n", found);
		return 5;
	}
	/* The checkpointer still runs and drops the oldest beyond --keep: if the one chosen went
	 * meanwhile (a loaded machine), take the next newer one (checked below all the same). */
	int rc;
	while ((rc = cow_restore(oldest)) == -ENOENT && oldest < last)
		oldest++;
	if (rc) {
		fprintf(stderr, "lmc_threads: cow_restore(%lld): %s\n", (long long)oldest, cow_strerror(rc));
		return 6;
	}
	if (!consistent(a, b, buf, got) || got == 0) {
		fprintf(stderr, "lmc_threads: after the restore to %lld: not consistent\n", (long long)oldest);
		return 1;
	}
	printf("lmc_threads: %d checkpoints, consistent cuts (%llu messages read at the oldest)\n", found,
	       (unsigned long long)got);
	return 0;
}
