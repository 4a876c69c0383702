/* A C program that uses only include/cow.h: map, write, snapshot, write, restore, compare. */
#include <cow.h>
#include <stdio.h>
#include <string.h>

int main(void)
{
	int rc = cow_init(NULL);
	if (rc < 0) {
		fprintf(stderr, "cow_init: %s\n", cow_strerror(rc));
		return 1;
	}
	if (strcmp(cow_backend(), "kmod") != 0)
		return 2;
	unsigned char *m = cow_map(1 << 20);
	if (!m)
		return 3;
	for (int i = 0; i < (1 << 20); i++)
		m[i] = (unsigned char)(i * 13);
	int64_t id = cow_snapshot();
	if (id < 1)
		return 4;
	memset(m, 0xee, 1 << 19);
	if (cow_restore(id) != 0)
		return 5;
	for (int i = 0; i < (1 << 20); i++)
		if (m[i] != (unsigned char)(i * 13)) {
			fprintf(stderr, "byte %d differs\n", i);
			return 6;
		}
	if (cow_restore(id + 100) != -2 /* -ENOENT */)
		return 7;
	if (cow_drop(id) != 0)
		return 8;
	puts("cabi: ok");
	return 0;
}
