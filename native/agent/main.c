/*
 * main.c: start-up (error mode, SeDebugPrivilege), the user address space,
 * HELLO, and the dispatch table from opcode to handler (requests arrive
 * parsed: see requests.c).
 *
 * hotpatch-agent.exe takes no arguments; it serves requests on stdin/stdout
 * until stdin closes, then exits 0.
 */
#include "agent.h"

int dispatch(request_t *rq, const args_t *args);

static int g_debug_privilege;

/* ------------------------------------------------------------------------
 * The user address space every request range must lie in
 * --------------------------------------------------------------------- */
const user_space_t *user_space(void)
{
    static user_space_t space;
    if (!space.highest) {
        SYSTEM_INFO si;
        GetSystemInfo(&si);
        space.lowest = (uint64_t)(uintptr_t)si.lpMinimumApplicationAddress;
        space.highest = (uint64_t)(uintptr_t)si.lpMaximumApplicationAddress;
    }
    return &space;
}

/* ------------------------------------------------------------------------
 * SeDebugPrivilege: lets OpenProcess reach processes of other users and
 * services when the agent runs elevated. Not having it is not an error.
 * --------------------------------------------------------------------- */
static int enable_debug_privilege(void)
{
    HANDLE token;
    TOKEN_PRIVILEGES tp;
    int ok;

    if (!OpenProcessToken(GetCurrentProcess(), TOKEN_ADJUST_PRIVILEGES | TOKEN_QUERY, &token)) {
        TRACE("OpenProcessToken failed: %lu", (unsigned long)GetLastError());
        return 0;
    }
    tp.PrivilegeCount = 1;
    tp.Privileges[0].Attributes = SE_PRIVILEGE_ENABLED;
    ok = LookupPrivilegeValueW(NULL, L"SeDebugPrivilege", &tp.Privileges[0].Luid) &&
         AdjustTokenPrivileges(token, FALSE, &tp, sizeof tp, NULL, NULL) &&
         GetLastError() == ERROR_SUCCESS; /* ERROR_NOT_ALL_ASSIGNED otherwise */
    TRACE("SeDebugPrivilege %s (%lu)", ok ? "enabled" : "not held", (unsigned long)GetLastError());
    CloseHandle(token);
    return ok;
}

/* ------------------------------------------------------------------------
 * HELLO
 * --------------------------------------------------------------------- */
int op_hello(request_t *rq, const args_t *a)
{
    (void)a;
    wr_u16(&rq->out, AGENT_PROTOCOL_VERSION);
    wr_u16(&rq->out, (uint16_t)sizeof(void *));
    wr_u32(&rq->out, AGENT_MAX_FRAME);
    wr_u32(&rq->out, GetCurrentProcessId());
    wr_u32(&rq->out, g_debug_privilege ? 1u : 0u);
    wr_str(&rq->out, AGENT_VERSION);
    return ST_OK;
}

/* ------------------------------------------------------------------------
 * Dispatch
 * --------------------------------------------------------------------- */
typedef int (*handler_t)(request_t *rq, const args_t *args);

static const struct {
    uint16_t opcode;
    handler_t handler;
} g_handlers[] = {
    {OP_HELLO, op_hello},
    {OP_LIST_PROCESSES, op_list_processes},
    {OP_LIST_MODULES, op_list_modules},
    {OP_PROCESS_INFO, op_process_info},
    {OP_OPEN, op_open},
    {OP_CLOSE, op_close},
    {OP_READ, op_read},
    {OP_WRITE, op_write},
    {OP_QUERY, op_query},
    {OP_ALLOC_NEAR, op_alloc_near},
    {OP_FREE, op_free},
    {OP_PROTECT, op_protect},
    {OP_FLUSH, op_flush},
    {OP_THREADS, op_threads},
    {OP_THREAD_CONTEXTS, op_thread_contexts},
    {OP_REMOTE_CALL, op_remote_call},
    {OP_COMMIT, op_commit},
    {OP_FLOOR, op_floor},
};

int dispatch(request_t *rq, const args_t *args)
{
    size_t i;
    for (i = 0; i < sizeof g_handlers / sizeof g_handlers[0]; i++)
        if (g_handlers[i].opcode == rq->opcode)
            return g_handlers[i].handler(rq, args);
    return fail(rq, ST_UNKNOWN_OPCODE, "unknown opcode 0x%04x", (unsigned)rq->opcode);
}

int main(void)
{
    /* No message boxes: a failure must come back as a reply, not a dialog. */
    SetErrorMode(SEM_FAILCRITICALERRORS | SEM_NOGPFAULTERRORBOX | SEM_NOOPENFILEERRORBOX);
    g_debug_privilege = enable_debug_privilege();
    return protocol_serve();
}
