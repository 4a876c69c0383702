/*
 * A minimal Lua 5.4 interpreter (the lua-src crate ships the library, not lua.c): runs
 * SCRIPT with the global table `arg` = {ARGS...} and exits 0, or prints the error and exits 1.
 * scripts/lua builds it twice, with cowcc and with plain clang, for `cowctl bench --lmc`.
 * The script is read with read(2) into a stack buffer (stacks are never write-protected),
 * not through stdio into the heap: under the mprotect backend the kernel cannot write into a
 * write-protected page (EFAULT), and libc's reads inside fread are not prepared for it.
 * Usage: lua_run SCRIPT.lua [ARGS...]
 */
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

/* The whole file, NUL-terminated, or NULL. */
static char *slurp(const char *path, size_t *len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return NULL;
	size_t cap = 1 << 16, n = 0;
	char *buf = malloc(cap);
	for (;;) {
		if (!buf)
			break;
		if (n + 1 == cap) {
			char *bigger = realloc(buf, cap *= 2);
			if (!bigger) {
				free(buf);
				buf = NULL;
				break;
			}
			buf = bigger;
		}
		char chunk[4096];
		size_t want = cap - 1 - n < sizeof chunk ? cap - 1 - n : sizeof chunk;
		ssize_t got = read(fd, chunk, want);
		if (got < 0 && errno == EINTR)
			continue;
		if (got > 0)
			memcpy(buf + n, chunk, (size_t)got);
		if (got < 0) {
			free(buf);
			buf = NULL;
			break;
		}
		if (got == 0) {
			buf[n] = 0;
			*len = n;
			break;
		}
		n += (size_t)got;
	}
	close(fd);
	return buf;
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: %s SCRIPT.lua [ARGS...]\n", argv[0]);
		return 2;
	}
	lua_State *L = luaL_newstate();
	if (!L)
		return 1;
	luaL_openlibs(L);
	lua_createtable(L, argc - 2, 0);
	for (int i = 2; i < argc; i++) {
		lua_pushstring(L, argv[i]);
		lua_rawseti(L, -2, i - 1);
	}
	lua_setglobal(L, "arg");
	size_t len = 0;
	char *script = slurp(argv[1], &len);
	if (!script) {
		fprintf(stderr, "%s: cannot read %s: %s\n", argv[0], argv[1], strerror(errno));
		return 1;
	}
	char name[4096];
	snprintf(name, sizeof name, "@%s", argv[1]);
	if (luaL_loadbuffer(L, script, len, name) != LUA_OK || lua_pcall(L, 0, LUA_MULTRET, 0) != LUA_OK) {
		fprintf(stderr, "%s: %s\n", argv[0], lua_tostring(L, -1));
		lua_close(L);
		return 1;
	}
	lua_close(L);
	return 0;
}
