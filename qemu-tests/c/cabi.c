/*
 * A C program that uses only include/cow.h: map, write, snapshot, write, read the old image,
 * list dirty pages, restore, compare. Usage: cabi [BACKEND] (default: auto).
 */
#include <cow.h>
#include <stdio.h>
#include <string.h>

#define LEN (1 << 20)

int main(int argc, char **argv)
{
	const char *backend = argc > 1 ? argv[1] : NULL;
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
	for (int i = 0; i < LEN; i++)
		m[i] = (unsigned char)(i * 13);
	int64_t id = cow_snapshot();
	if (id < 1) {
		fprintf(stderr, "cow_snapshot: %s\n", cow_strerror((int)id));
		return 4;
	}
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
