/*
 * Lua probes: each call makes its own lua_State, runs one chunk under
 * lua_pcall and hashes what it returned or the error it raised, so a fix that
 * changes the compiler's code or an error path changes the value observed.
 */
#include "lauxlib.h"
#include "lua.h"
#include "lualib.h"

#include "../probe.h"

static int64_t run(const char *chunk)
{
    lua_State *L = luaL_newstate();
    uint32_t h = FNV_START;
    size_t size = 0;
    const char *text;
    int status;

    if (!L)
        return pack(9, 0);
    luaL_openlibs(L);
    status = luaL_loadbufferx(L, chunk, strlen(chunk), "=probe", "t");
    if (status == LUA_OK)
        status = lua_pcall(L, 0, 1, 0);
    text = luaL_tolstring(L, -1, &size);
    h = fnv(h, text, size);
    lua_close(L);
    return pack(status, h);
}

/* CVE-2022-28805: a <const> _ENV that is a compile-time constant is indexed as
 * if it were in a register. */
PROBE lua_env_const(void)
{
    return run("local _ENV <const> = 1; return x");
}

PROBE lua_env_const_str(void)
{
    return run("local t = {} local _ENV <const> = 'abc'; return y");
}

/* CVE-2022-33099: luaG_runerror and luaV_concat, reached through errors
 * raised while running Lua code. */
PROBE lua_runerror(void)
{
    return run("local t = {} local ok, err = pcall(function() return t.x.y end) "
               "return tostring(ok) .. ' ' .. err .. ' ' .. select('#', pcall(error))");
}

PROBE lua_concat_error(void)
{
    return run("local parts = {} for i = 1, 50 do parts[#parts + 1] = i .. 'x' .. i * 2 end "
               "local s = table.concat(parts, ',') "
               "local ok, err = pcall(function() return s .. 1 .. {} end) return s .. tostring(ok) .. err");
}

PROBE lua_basic(void)
{
    return run("local function fib(n) if n < 2 then return n end return fib(n - 1) + fib(n - 2) end "
               "return string.format('%d %s', fib(15), string.rep('ab', 3))");
}
