/*
 * A program that snapshots itself every epoch while rewriting the same 200 heap pages, for
 * `cowctl run --speculate=POLICY`: prints "ready PID" after 60 epochs and waits for a line on
 * stdin, so that `cowctl stats PID` can read what speculation did.
 */
#include <cow.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(void)
{
	if (cow_init(NULL) < 0)
		return 2;
	unsigned char *buf = malloc(4096 * 400);
	if (!buf)
		return 3;
	memset(buf, 1, 4096 * 400);
	for (int epoch = 0; epoch < 60; epoch++) {
		for (int p = 0; p < 200; p++)
			buf[p * 2 * 4096 + 17] = (unsigned char)epoch;
		int64_t id = cow_snapshot();
		if (id < 1)
			return 4;
		if (epoch > 2 && cow_drop(id - 2) != 0)
			return 5;
	}
	printf("ready %d\n", (int)getpid());
	fflush(stdout);
	char line[16];
	if (!fgets(line, sizeof line, stdin))
		return 0;
	return 0;
}
