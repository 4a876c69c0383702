/*
 * A minimal Lua 5.4 interpreter (the lua-src crate ships the library, not lua.c): runs
 * SCRIPT with the global table `arg` = {ARGS...} and exits 0, or prints the error and exits 1.
 * scripts/lua builds it twice, with cowcc and with plain clang, for `cowctl bench --lmc`.
 * Usage: lua_run SCRIPT.lua [ARGS...]
 */
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <stdio.h>

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
	if (luaL_dofile(L, argv[1]) != LUA_OK) {
		fprintf(stderr, "%s: %s\n", argv[0], lua_tostring(L, -1));
		lua_close(L);
		return 1;
	}
	lua_close(L);
	return 0;
}
