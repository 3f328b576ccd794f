/*
 * hotpatch-agent: shared declarations.
 *
 * The agent is a small Win32 program that Python drives over stdin/stdout
 * with the framed binary protocol documented in docs/AGENT.md. Every request
 * is parsed by parse_request (wire.h: portable, fuzzed natively under
 * sanitizers) into checked arguments before any Win32 call; every reply is
 * built in a bounded writer; a handler either fills the reply or records an
 * error (status, failing call, GetLastError()) with the fail* helpers, and
 * returns the status. Files:
 *
 *   wire.c      reader/writer, errors, frames (portable)
 *   requests.c  the request parsers and range checks (portable)
 *   protocol.c  pipe I/O and the request loop
 *   main.c      request loop, dispatch, HELLO, SeDebugPrivilege
 *   procs.c     processes, modules, threads, the table of open processes
 *   memory.c    read, write, query, allocate near, free, protect, flush
 *   freeze.c    suspending every thread, contexts, COMMIT and the floor
 *   remote.c    calling a function in the target (CreateRemoteThread)
 */
#ifndef HOTPATCH_AGENT_H
#define HOTPATCH_AGENT_H

#include <windows.h>

#include "wire.h"

/* A wide string as the protocol's str (UTF-8, u16 length). */
void wr_wstr(writer_t *w, const WCHAR *s);
/* Records GetLastError() first, so call it right after the failing call. */
int fail_win32(request_t *rq, const char *call, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* The user address space, from GetSystemInfo: request ranges must lie in it. */
const user_space_t *user_space(void);

int protocol_serve(void);

/* ------------------------------------------------------------------------
 * Open processes (procs.c)
 * --------------------------------------------------------------------- */
typedef struct {
    HANDLE process;
    DWORD pid;
    uint32_t id;
    uint64_t start_time;
} target_t;

target_t *target_get(request_t *rq, uint32_t id);
/* After a failed call on an open process: NO_PROCESS if it exited, else WIN32. */
int target_fail(request_t *rq, target_t *t, const char *call, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* Thread ids of pid (Toolhelp32), malloc'd; returns 0 and sets rq on failure. */
int thread_ids(request_t *rq, DWORD pid, DWORD **out, size_t *count);

int op_list_processes(request_t *rq, const args_t *a);
int op_list_modules(request_t *rq, const args_t *a);
int op_process_info(request_t *rq, const args_t *a);
int op_open(request_t *rq, const args_t *a);
int op_close(request_t *rq, const args_t *a);
int op_threads(request_t *rq, const args_t *a);

/* ------------------------------------------------------------------------
 * Memory (memory.c)
 * --------------------------------------------------------------------- */
/* The pages a set of writes touches and, once unlocked, the spans made
 * writable with the protection each had before. */
typedef struct {
    uint64_t start, size;
    DWORD old;
} span_t;

typedef struct {
    uint64_t *page;
    size_t count, cap;
    span_t *span;
    size_t spans, span_cap; /* spans made writable so far, to be restored */
} pages_t;

int pages_add(request_t *rq, pages_t *set, uint64_t address, size_t len);
/* Makes every page PAGE_EXECUTE_READWRITE; on failure restores those done. */
int pages_unlock(request_t *rq, target_t *t, pages_t *set);
/* Restores the recorded protections; keeps the first error in rq. */
int pages_relock(request_t *rq, target_t *t, pages_t *set);
void pages_free(pages_t *set);

int read_raw(request_t *rq, target_t *t, uint64_t address, uint8_t *data, size_t len);
int write_raw(request_t *rq, target_t *t, uint64_t address, const uint8_t *data, size_t len);
/* Writes through page protection (made writable, then restored), and flushes. */
int write_through(request_t *rq, target_t *t, uint64_t address, const uint8_t *data, size_t len);

int op_read(request_t *rq, const args_t *a);
int op_write(request_t *rq, const args_t *a);
int op_query(request_t *rq, const args_t *a);
int op_alloc_near(request_t *rq, const args_t *a);
int op_free(request_t *rq, const args_t *a);
int op_protect(request_t *rq, const args_t *a);
int op_flush(request_t *rq, const args_t *a);

/* ------------------------------------------------------------------------
 * Freezing threads and committing (freeze.c), remote calls (remote.c)
 * --------------------------------------------------------------------- */
int op_thread_contexts(request_t *rq, const args_t *a);
int op_commit(request_t *rq, const args_t *a);
int op_floor(request_t *rq, const args_t *a);
int op_remote_call(request_t *rq, const args_t *a);

/* main.c */
int op_hello(request_t *rq, const args_t *a);

#endif
