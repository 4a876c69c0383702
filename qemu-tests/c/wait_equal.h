/* Shared by the thread tests: wait until two counters in shared memory agree (every signal
 * sent has been handled), or fail after about 10 s of 10 µs sleeps (a hang is a failure).
 * The including file defines fail(const char *). */
#ifndef WAIT_EQUAL_H
#define WAIT_EQUAL_H

#include <stdatomic.h>
#include <unistd.h>

#define WAIT_EQUAL(a, b, what)                                                   \
	do {                                                                     \
		for (long spins_ = 0; atomic_load(a) != atomic_load(b); spins_++) { \
			if (spins_ > 1000 * 1000)                                \
				fail(what);                                      \
			usleep(10);                                              \
		}                                                                \
	} while (0)

#endif
