/*
 * procs.c: processes, their modules and threads (Toolhelp32), and the small
 * table of processes the client has opened.
 */
#include "agent.h"

#include <stdarg.h>
#include <stdlib.h>
#include <tlhelp32.h>

#define OPEN_ACCESS                                                                     \
    (PROCESS_QUERY_INFORMATION | PROCESS_VM_OPERATION | PROCESS_VM_READ | PROCESS_VM_WRITE | \
     PROCESS_CREATE_THREAD | PROCESS_SUSPEND_RESUME | SYNCHRONIZE)

static target_t g_targets[AGENT_MAX_HANDLES];
static uint32_t g_generation;

/* ------------------------------------------------------------------------
 * Process liveness: a pid that OpenProcess calls invalid does not exist, a
 * signalled process handle has exited. Both are NO_PROCESS to the client.
 * --------------------------------------------------------------------- */
static uint64_t filetime_u64(FILETIME ft)
{
    return ((uint64_t)ft.dwHighDateTime << 32) | ft.dwLowDateTime;
}

static int exited(HANDLE process)
{
    return WaitForSingleObject(process, 0) == WAIT_OBJECT_0;
}

/* Opens pid with `access` (plus SYNCHRONIZE); NULL with rq set on failure. */
static HANDLE open_live(request_t *rq, DWORD pid, DWORD access)
{
    HANDLE process = OpenProcess(access | SYNCHRONIZE, FALSE, pid);
    if (!process) {
        if (GetLastError() == ERROR_INVALID_PARAMETER)
            fail(rq, ST_NO_PROCESS, "no process with pid %lu", (unsigned long)pid);
        else
            fail_win32(rq, "OpenProcess", "pid %lu", (unsigned long)pid);
        return NULL;
    }
    if (exited(process)) {
        CloseHandle(process);
        fail(rq, ST_NO_PROCESS, "process %lu has exited", (unsigned long)pid);
        return NULL;
    }
    return process;
}

static int start_time(request_t *rq, HANDLE process, uint64_t *out)
{
    FILETIME created, ended, kernel, user;
    if (!GetProcessTimes(process, &created, &ended, &kernel, &user))
        return fail_win32(rq, "GetProcessTimes", "process start time");
    *out = filetime_u64(created);
    return ST_OK;
}

/* ------------------------------------------------------------------------
 * The table of open processes. Ids carry a generation in their high bits so
 * a closed id is not silently reused for another process.
 * --------------------------------------------------------------------- */
target_t *target_get(request_t *rq, uint32_t id)
{
    uint32_t slot = (id & 0xFF) - 1;
    if ((id & 0xFF) == 0 || slot >= AGENT_MAX_HANDLES || g_targets[slot].id != id ||
        !g_targets[slot].process) {
        fail(rq, ST_BAD_HANDLE, "no open process with handle %lu", (unsigned long)id);
        return NULL;
    }
    return &g_targets[slot];
}

int target_fail(request_t *rq, target_t *t, const char *call, const char *fmt, ...)
{
    DWORD error = GetLastError();
    char detail[192];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    if (exited(t->process))
        return fail(rq, ST_NO_PROCESS, "process %lu has exited (%s)", (unsigned long)t->pid, detail);
    SetLastError(error);
    return fail_win32(rq, call, "%s", detail);
}

int op_open(request_t *rq, const args_t *a)
{
    uint32_t pid = a->pid, slot;
    HANDLE process;
    uint64_t started = 0;

    for (slot = 0; slot < AGENT_MAX_HANDLES; slot++)
        if (!g_targets[slot].process)
            break;
    if (slot == AGENT_MAX_HANDLES)
        return fail(rq, ST_LIMIT, "all %d process handles are in use", AGENT_MAX_HANDLES);
    process = open_live(rq, pid, OPEN_ACCESS);
    if (!process)
        return rq->status;
    if (start_time(rq, process, &started)) {
        CloseHandle(process);
        return rq->status;
    }
    g_generation = (g_generation + 1) & 0xFFFFFF;
    g_targets[slot].process = process;
    g_targets[slot].pid = pid;
    g_targets[slot].start_time = started;
    g_targets[slot].id = (g_generation << 8) | (slot + 1);
    TRACE("opened pid %lu as %lu", (unsigned long)pid, (unsigned long)g_targets[slot].id);
    wr_u32(&rq->out, g_targets[slot].id);
    wr_u64(&rq->out, started);
    return ST_OK;
}

int op_close(request_t *rq, const args_t *a)
{
    target_t *t = target_get(rq, a->handle);

    if (!t)
        return rq->status;
    CloseHandle(t->process);
    t->process = NULL;
    t->id = 0;
    return ST_OK;
}

/* ------------------------------------------------------------------------
 * Processes
 * --------------------------------------------------------------------- */
int op_list_processes(request_t *rq, const args_t *a)
{
    HANDLE snap;
    PROCESSENTRY32W entry;
    size_t count_slot;
    uint32_t count = 0;

    (void)a;
    snap = CreateToolhelp32Snapshot(TH32CS_SNAPPROCESS, 0);
    if (snap == INVALID_HANDLE_VALUE)
        return fail_win32(rq, "CreateToolhelp32Snapshot", "process snapshot");
    count_slot = wr_slot_u32(&rq->out);
    entry.dwSize = sizeof entry;
    if (Process32FirstW(snap, &entry)) {
        do {
            wr_u32(&rq->out, entry.th32ProcessID);
            wr_u32(&rq->out, entry.th32ParentProcessID);
            wr_u32(&rq->out, entry.cntThreads);
            wr_wstr(&rq->out, entry.szExeFile);
            count++;
        } while (Process32NextW(snap, &entry));
    }
    CloseHandle(snap);
    wr_put_u32_at(&rq->out, count_slot, count);
    return ST_OK;
}

int op_process_info(request_t *rq, const args_t *a)
{
    uint32_t pid = a->pid;
    HANDLE process;
    uint64_t started = 0;
    WCHAR path[MAX_PATH * 2];
    DWORD path_len = sizeof path / sizeof path[0];

    process = open_live(rq, pid, PROCESS_QUERY_LIMITED_INFORMATION);
    if (!process)
        return rq->status;
    if (start_time(rq, process, &started)) {
        CloseHandle(process);
        return rq->status;
    }
    if (!QueryFullProcessImageNameW(process, 0, path, &path_len))
        path[0] = 0; /* informative only */
    CloseHandle(process);
    wr_u64(&rq->out, started);
    wr_wstr(&rq->out, path);
    return ST_OK;
}

/* ------------------------------------------------------------------------
 * Modules
 * --------------------------------------------------------------------- */
int op_list_modules(request_t *rq, const args_t *a)
{
    uint32_t pid = a->pid;
    HANDLE process, snap = INVALID_HANDLE_VALUE;
    MODULEENTRY32W entry;
    size_t count_slot;
    uint32_t count = 0;
    int tries;

    process = open_live(rq, pid, PROCESS_QUERY_LIMITED_INFORMATION);
    if (!process)
        return rq->status;
    /* ERROR_BAD_LENGTH: the module list changed while it was read; retry. */
    for (tries = 0; tries < 8; tries++) {
        snap = CreateToolhelp32Snapshot(TH32CS_SNAPMODULE, pid);
        if (snap != INVALID_HANDLE_VALUE || GetLastError() != ERROR_BAD_LENGTH)
            break;
    }
    if (snap == INVALID_HANDLE_VALUE) {
        DWORD error = GetLastError();
        int gone = exited(process);
        CloseHandle(process);
        if (gone)
            return fail(rq, ST_NO_PROCESS, "process %lu has exited", (unsigned long)pid);
        SetLastError(error);
        return fail_win32(rq, "CreateToolhelp32Snapshot", "modules of pid %lu", (unsigned long)pid);
    }
    CloseHandle(process);
    /* The count goes before the entries: keep its offset, not a pointer,
     * since the reply buffer moves as the entries make it grow. */
    count_slot = wr_slot_u32(&rq->out);
    entry.dwSize = sizeof entry;
    if (Module32FirstW(snap, &entry)) {
        do {
            wr_u64(&rq->out, (uint64_t)(uintptr_t)entry.modBaseAddr);
            wr_u32(&rq->out, entry.modBaseSize);
            wr_wstr(&rq->out, entry.szModule);
            wr_wstr(&rq->out, entry.szExePath);
            count++;
        } while (Module32NextW(snap, &entry));
    }
    CloseHandle(snap);
    wr_put_u32_at(&rq->out, count_slot, count);
    return ST_OK;
}

/* ------------------------------------------------------------------------
 * Threads
 * --------------------------------------------------------------------- */
int thread_ids(request_t *rq, DWORD pid, DWORD **out, size_t *count)
{
    HANDLE snap = CreateToolhelp32Snapshot(TH32CS_SNAPTHREAD, 0);
    THREADENTRY32 entry;
    DWORD *ids = NULL;
    size_t n = 0, cap = 0;

    *out = NULL;
    *count = 0;
    if (snap == INVALID_HANDLE_VALUE) {
        fail_win32(rq, "CreateToolhelp32Snapshot", "thread snapshot");
        return 0;
    }
    entry.dwSize = sizeof entry;
    if (Thread32First(snap, &entry)) {
        do {
            if (entry.th32OwnerProcessID != pid)
                continue;
            if (n == cap) {
                DWORD *grown;
                if (cap >= AGENT_MAX_THREADS) {
                    free(ids);
                    CloseHandle(snap);
                    fail(rq, ST_LIMIT, "more than %u threads", AGENT_MAX_THREADS);
                    return 0;
                }
                cap = cap ? cap * 2 : 64;
                grown = realloc(ids, cap * sizeof *ids);
                if (!grown) {
                    free(ids);
                    CloseHandle(snap);
                    fail(rq, ST_LIMIT, "out of memory listing threads");
                    return 0;
                }
                ids = grown;
            }
            ids[n++] = entry.th32ThreadID;
        } while (Thread32Next(snap, &entry));
    }
    CloseHandle(snap);
    *out = ids;
    *count = n;
    return 1;
}

int op_threads(request_t *rq, const args_t *a)
{
    uint32_t pid = a->pid;
    HANDLE process;
    DWORD *ids;
    size_t n, i;

    process = open_live(rq, pid, PROCESS_QUERY_LIMITED_INFORMATION);
    if (!process)
        return rq->status;
    CloseHandle(process);
    if (!thread_ids(rq, pid, &ids, &n))
        return rq->status;
    wr_u32(&rq->out, (uint32_t)n);
    for (i = 0; i < n; i++)
        wr_u32(&rq->out, ids[i]);
    free(ids);
    return ST_OK;
}
