/*
 * Lua 5.4 (the lua-src crate's copy, compiled with cowcc along with this file) on the lmc
 * backend. Runs a script's `setup` chunk, takes a checkpoint, runs its `work` chunk and keeps
 * what it printed, restores the checkpoint, runs `work` again: both outputs must be equal
 * (and equal to the uninstrumented build's, which the test compares from outside).
 * Usage: lmc_lua SCRIPT.lua [ROUNDS]  — SCRIPT defines global functions setup() and work();
 * ROUNDS -1: no checkpoint at all (the cost of the instrumentation alone).
 * Prints the output of the first `work`, then "lmc_lua: N rollbacks, outputs identical".
 */
#include <cow.h>
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* What `work` printed, in memory libcow does not cover (a restore must not rewind it). */
static char *out;
static size_t out_len, out_cap;

static int capture(lua_State *L)
{
	size_t n;
	const char *s = luaL_tolstring(L, 1, &n);
	if (out_len + n + 1 > out_cap)
		return luaL_error(L, "output too long");
	memcpy(out + out_len, s, n);
	out[out_len + n] = '\n';
	out_len += n + 1;
	return 0;
}

static void call(lua_State *L, const char *fn)
{
	lua_getglobal(L, fn);
	if (lua_pcall(L, 0, 0, 0) != LUA_OK) {
		fprintf(stderr, "lmc_lua: %s: %s\n", fn, lua_tostring(L, -1));
		exit(3);
	}
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: %s SCRIPT.lua [ROUNDS]\n", argv[0]);
		return 2;
	}
	int rounds = argc > 2 ? atoi(argv[2]) : 3;
	int instrumented = cow_init("lmc") == 0;
	out_cap = 1 << 20;
	out = instrumented ? cow_alloc_uncovered(out_cap) : malloc(out_cap);
	char *first = instrumented ? cow_alloc_uncovered(out_cap) : malloc(out_cap);
	if (!out || !first)
		return 4;
	lua_State *L = luaL_newstate();
	luaL_openlibs(L);
	lua_register(L, "emit", capture);
	if (luaL_dofile(L, argv[1]) != LUA_OK) {
		fprintf(stderr, "lmc_lua: %s\n", lua_tostring(L, -1));
		return 3;
	}
	call(L, "setup");
	if (rounds < 0)
		instrumented = 0;
	int64_t id = instrumented ? cow_snapshot() : 0;
	if (id < 0)
		return 5;
	call(L, "work");
	size_t first_len = out_len;
	memcpy(first, out, out_len);
	fwrite(first, 1, first_len, stdout);
	if (!instrumented) {
		lua_close(L);
		return 0;
	}
	for (int r = 0; r < rounds; r++) {
		if (cow_restore(id) != 0)
			return 6;
		out_len = 0;
		call(L, "work");
		if (out_len != first_len || memcmp(out, first, out_len)) {
			fprintf(stderr, "lmc_lua: round %d after a rollback printed something else\n", r);
			return 1;
		}
	}
	lua_close(L);
	printf("lmc_lua: %d rollbacks, outputs identical\n", rounds);
	return 0;
}
