/*
 * A C program that uses only include/cow.h: map, write, snapshot, write, read the old image,
 * list dirty pages, restore, compare; then every function with invalid arguments, named and
 * random: each must return the errno cow.h promises, never crash. Usage: cabi [BACKEND]
 * (default: auto).
 */
#include <cow.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define LEN (1 << 20)

/* Fails the program with the line of the first broken promise. */
#define EXPECT(cond)                                                                   \
	do {                                                                           \
		if (!(cond)) {                                                         \
			fprintf(stderr, "cabi: %s:%d: %s\n", __FILE__, __LINE__, #cond); \
			exit(20);                                                      \
		}                                                                      \
	} while (0)

/* Calls before cow_init: -EBADFD (or NULL + EBADFD), never a crash. */
static void before_init(void)
{
	char buf[8];
	void *pages[4];
	EXPECT(cow_snapshot() == -EBADFD);
	EXPECT(cow_restore(1) == -EBADFD);
	EXPECT(cow_drop(1) == -EBADFD);
	EXPECT(cow_read(1, buf, buf, sizeof buf) == -EBADFD);
	EXPECT(cow_dirty(1, pages, 4) == -EBADFD);
	errno = 0;
	EXPECT(cow_map(4096) == NULL && errno == EBADFD);
	EXPECT(strcmp(cow_backend(), "none") == 0);
	EXPECT(cow_init("no-such-backend") == -EINVAL);
	EXPECT(cow_strerror(INT_MIN) != NULL && cow_strerror(0) != NULL);
	EXPECT(cow_strerror(-12345) != NULL && cow_strerror(12345) != NULL);
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint64_t next(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

/* After cow_init, with snapshot `id` of the covered `m` held: named invalid arguments, then
 * random ones. `gone` is a page that was unmapped before the snapshot (the page below it is
 * mapped). */
static void bad_arguments(unsigned char *m, int64_t id, unsigned char *gone)
{
	unsigned char buf[256];
	void *pages[8];
	errno = 0;
	EXPECT(cow_map(0) == NULL && errno == EINVAL);
	EXPECT(cow_read(id, m, NULL, 16) == -EFAULT);
	EXPECT(cow_read(id, m, NULL, 0) == 0);
	EXPECT(cow_dirty(id, NULL, 8) == -EFAULT);
	EXPECT(cow_dirty(id, NULL, 0) >= 0);
	EXPECT(cow_read(id, gone, buf, 16) == -EFAULT);
	EXPECT(cow_read(id, NULL, buf, 16) == -EFAULT);
	EXPECT(cow_read(id, gone - 8, buf, 16) == -EFAULT); /* runs into the unmapped page */
	for (int64_t bad = -3; bad <= 0; bad++) {
		EXPECT(cow_read(bad, m, buf, 16) == -ENOENT);
		EXPECT(cow_dirty(bad, pages, 8) == -ENOENT);
		EXPECT(cow_restore(bad) == -ENOENT);
		EXPECT(cow_drop(bad) == -ENOENT);
	}
	EXPECT(cow_read(INT64_MAX, m, buf, 16) == -ENOENT);
	EXPECT(cow_restore(id + 1000) == -ENOENT);
	EXPECT(cow_drop(id + 1000) == -ENOENT);
	EXPECT(cow_dirty(INT64_MIN, pages, 8) == -ENOENT);
	const char *other = strcmp(cow_backend(), "mprotect") ? "mprotect" : "fork";
	EXPECT(cow_init(other) == -EBUSY);
	EXPECT(cow_init(cow_backend()) == 0);

	/* Random arguments: unknown ids, addresses inside, around and far from covered memory,
	 * lengths up to the buffer. Each call returns 0 or the documented errno. */
	for (int i = 0; i < 3000; i++) {
		uint64_t r = next();
		int64_t some_id = (r & 3) == 0 ? id : (int64_t)next();
		uintptr_t where;
		switch (r >> 2 & 3) {
		case 0: where = (uintptr_t)m + next() % LEN; break;
		case 1: where = (uintptr_t)gone + next() % 4096; break;
		case 2: where = next() & 0x7fffffffffffull; break;
		default: where = (uintptr_t)m - 4096 + next() % 8192; break;
		}
		size_t len = next() % sizeof buf;
		int rc = cow_read(some_id, (const void *)where, buf, len);
		int inside = where >= (uintptr_t)m && where + len <= (uintptr_t)m + LEN;
		if (some_id == id && inside)
			EXPECT(rc == 0);
		else if (some_id == id)
			EXPECT(rc == 0 || rc == -EFAULT);
		else if (some_id != id && len > 0)
			EXPECT(rc == -ENOENT || rc == 0); /* a random id may exist by chance: 0 */
		int64_t n = cow_dirty(some_id, (r & 16) ? pages : NULL, (r & 16) ? 8 : 0);
		EXPECT(n >= 0 || n == -ENOENT);
		if (some_id != id && some_id > id) {
			EXPECT(cow_drop(some_id) == -ENOENT);
			EXPECT(cow_restore(some_id) == -ENOENT);
		}
	}
	/* The snapshot survived all of it. */
	EXPECT(cow_read(id, m + 4096, buf, 8) == 0 && buf[5] == (unsigned char)((4096 + 5) * 13));
}

int main(int argc, char **argv)
{
	const char *backend = argc > 1 ? argv[1] : NULL;
	before_init();
	int rc = cow_init(backend);
	if (rc < 0) {
		fprintf(stderr, "cow_init(%s): %s\n", backend ? backend : "auto", cow_strerror(rc));
		return 1;
	}
	if (backend && strcmp(cow_backend(), backend) != 0)
		return 2;
	if (!*cow_backend_reason())
		return 2;
	unsigned char *m = cow_map(LEN);
	if (!m)
		return 3;
	/* Two private pages; the second is unmapped before the snapshot. */
	unsigned char *pair = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	EXPECT(pair != MAP_FAILED);
	memset(pair, 1, 8192);
	unsigned char *gone = pair + 4096;
	EXPECT(munmap(gone, 4096) == 0);
	for (int i = 0; i < LEN; i++)
		m[i] = (unsigned char)(i * 13);
	int64_t id = cow_snapshot();
	if (id < 1) {
		fprintf(stderr, "cow_snapshot: %s\n", cow_strerror((int)id));
		return 4;
	}
	bad_arguments(m, id, gone);
	memset(m, 0xee, LEN / 2);
	unsigned char old[64];
	if (cow_read(id, m + 4096, old, sizeof old) != 0 || old[5] != (unsigned char)((4096 + 5) * 13))
		return 5;
	void *pages[512];
	int64_t n = cow_dirty(id, pages, 512);
	if (n < LEN / 2 / 4096) {
		fprintf(stderr, "cow_dirty: %lld pages\n", (long long)n);
		return 6;
	}
	if (cow_restore(id) != 0)
		return 7;
	for (int i = 0; i < LEN; i++)
		if (m[i] != (unsigned char)(i * 13)) {
			fprintf(stderr, "byte %d differs\n", i);
			return 8;
		}
	if (cow_restore(id + 100) != -2 /* -ENOENT */)
		return 9;
	if (cow_drop(id) != 0)
		return 10;
	printf("cabi: ok (%s: %s)\n", cow_backend(), cow_backend_reason());
	return 0;
}
