/*
 * A program with a planted bug, for time-travel debugging tests: it appends a node to a
 * linked list every iteration (sleeping a little in insert(), where checkpoints mostly land);
 * at iteration BUG (chosen by the seed) insert() overwrites the head's magic — the list's
 * invariant `list.head->magic == 0x5eed` is broken from then on. It logs each iteration to
 * stderr ("iter N") so a test can check what the recording says. With "crash" it ends by
 * dereferencing a pointer past the tail; with "wait" it reads one byte of stdin before it
 * exits (a test can then look at it alive after its work).
 * Usage: buggy_list SEED ITERATIONS [THREADS] [crash|wait]
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct node {
	long magic;
	long value;
	struct node *next;
};

struct list {
	struct node *head, *tail;
	long length;
};

struct list list;
long iteration;
long bug_at;

static void insert(struct list *l, long value, long at)
{
	struct node *n = malloc(sizeof *n);
	n->magic = 0x5eed;
	n->value = value;
	n->next = NULL;
	if (l->tail)
		l->tail->next = n;
	else
		l->head = n;
	l->tail = n;
	l->length++;
	if (at == bug_at && l == &list)
		l->head->magic = 0xbad; /* the planted bug */
	usleep(2000);
}

static void step(long i)
{
	long value = i * 7 + 1;
	iteration = i;
	fprintf(stderr, "iter %ld\n", i);
	insert(&list, value, i);
}

/* Dereferences the pointer past the tail: SIGSEGV. */
static void __attribute__((noinline)) crash_now(struct list *l)
{
	struct node *past = l->tail->next;
	past->value = l->length;
}

static long iterations;

static void *worker(void *arg)
{
	struct list mine = { 0 };
	for (long i = 0; i < iterations; i++)
		insert(&mine, i + (long)arg, -1);
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc < 3)
		return 2;
	long seed = atol(argv[1]);
	iterations = atol(argv[2]);
	int threads = argc > 3 ? atoi(argv[3]) : 1;
	int crash = argc > 4 && strcmp(argv[4], "crash") == 0;
	int wait_stdin = argc > 4 && strcmp(argv[4], "wait") == 0;
	bug_at = iterations / 4 + seed % (iterations / 2);
	fprintf(stderr, "bug at %ld\n", bug_at);
	pthread_t t[8];
	for (int k = 1; k < threads && k < 8; k++)
		pthread_create(&t[k], NULL, worker, (void *)(long)(k * 1000));
	for (long i = 0; i < iterations; i++)
		step(i);
	if (crash)
		crash_now(&list);
	for (int k = 1; k < threads && k < 8; k++)
		pthread_join(t[k], NULL);
	printf("length %ld\n", list.length);
	if (wait_stdin) {
		char byte;
		fflush(stdout);
		if (read(0, &byte, 1) < 0)
			return 1;
	}
	return 0;
}
