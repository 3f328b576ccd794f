/*
 * hotpatch-agent: shared declarations.
 *
 * The agent is a small Win32 program that Python drives over stdin/stdout
 * with the framed binary protocol documented in docs/AGENT.md. Every request
 * is parsed through a bounds-checked reader, every reply built in a bounded
 * writer; a handler either fills the reply or records an error (status,
 * failing call, GetLastError()) with the fail* helpers, and returns the
 * status. Files:
 *
 *   protocol.c  framing, reader/writer, error replies
 *   main.c      request loop, dispatch, HELLO, SeDebugPrivilege
 *   procs.c     processes, modules, threads, the table of open processes
 *   memory.c    read, write, query, allocate near, free, protect, flush
 *   freeze.c    suspending every thread, contexts, COMMIT and the floor
 *   remote.c    calling a function in the target (CreateRemoteThread)
 */
#ifndef HOTPATCH_AGENT_H
#define HOTPATCH_AGENT_H

#include <windows.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* ------------------------------------------------------------------------
 * Versions and limits
 * --------------------------------------------------------------------- */
#define AGENT_PROTOCOL_VERSION 1
#define AGENT_VERSION "0.1.0"

#define AGENT_HEADER_SIZE 12u
#define AGENT_MAX_FRAME (64u * 1024u * 1024u) /* header + payload */
#define AGENT_MAX_PAYLOAD (AGENT_MAX_FRAME - AGENT_HEADER_SIZE)
#define AGENT_MAX_HANDLES 64
#define AGENT_MAX_WRITE 4096u        /* bytes in one COMMIT write */
#define AGENT_MAX_WRITES 16384u      /* writes in one COMMIT */
#define AGENT_MAX_ATTEMPTS 1000u     /* COMMIT freeze attempts */
#define AGENT_MAX_RETRY_SLEEP_MS 1000u
#define AGENT_MAX_THREADS 65536u     /* threads of one target */
#define AGENT_MAX_STACK_SCAN (8u * 1024u * 1024u)

/* ------------------------------------------------------------------------
 * Opcodes (request and reply share the opcode)
 * --------------------------------------------------------------------- */
enum {
    OP_HELLO = 0x01,
    OP_LIST_PROCESSES = 0x02,
    OP_LIST_MODULES = 0x03,
    OP_PROCESS_INFO = 0x04,
    OP_OPEN = 0x05,
    OP_CLOSE = 0x06,
    OP_READ = 0x07,
    OP_WRITE = 0x08,
    OP_QUERY = 0x09,
    OP_ALLOC_NEAR = 0x0A,
    OP_FREE = 0x0B,
    OP_PROTECT = 0x0C,
    OP_FLUSH = 0x0D,
    OP_THREADS = 0x0E,
    OP_THREAD_CONTEXTS = 0x0F,
    OP_REMOTE_CALL = 0x10,
    OP_COMMIT = 0x11,
    OP_FLOOR = 0x12
};

/* ------------------------------------------------------------------------
 * Reply statuses
 * --------------------------------------------------------------------- */
enum {
    ST_OK = 0,
    ST_BAD_FRAME = 1,      /* frame longer than AGENT_MAX_FRAME */
    ST_BAD_VERSION = 2,    /* header version is not AGENT_PROTOCOL_VERSION */
    ST_UNKNOWN_OPCODE = 3,
    ST_BAD_PAYLOAD = 4,    /* truncated, trailing bytes, bad count or range */
    ST_WIN32 = 5,          /* a Win32 call failed: call name + GetLastError */
    ST_NO_PROCESS = 6,     /* the pid does not exist or has exited */
    ST_BAD_HANDLE = 7,     /* no open process with that handle id */
    ST_BUSY = 8,           /* a thread stayed inside bytes about to change */
    ST_MISMATCH = 9,       /* expected bytes not found; nothing written */
    ST_TIMEOUT = 10,       /* the remote thread did not finish in time */
    ST_NO_SPACE = 11,      /* no free region within reach */
    ST_LIMIT = 12,         /* an agent table is full, or a reply too large */
    ST_ROLLBACK_FAILED = 13 /* a write failed and undoing it failed too */
};

/* ------------------------------------------------------------------------
 * Trace: compiled out unless built with -DAGENT_TRACE=1; the dead branch
 * keeps the arguments type-checked and "used".
 * --------------------------------------------------------------------- */
#ifndef AGENT_TRACE
#define AGENT_TRACE 0
#endif
#define TRACE(...)                                                            \
    do {                                                                      \
        if (AGENT_TRACE) {                                                    \
            fprintf(stderr, "agent: " __VA_ARGS__);                           \
            fputc('\n', stderr);                                              \
            fflush(stderr);                                                   \
        }                                                                     \
    } while (0)

/* ------------------------------------------------------------------------
 * Bounded reader over a request payload, bounded writer for a reply
 * --------------------------------------------------------------------- */
typedef struct {
    const uint8_t *data;
    size_t size;
    size_t pos;
} reader_t;

typedef struct {
    uint8_t *data;
    size_t size;
    size_t cap;
    int overflow; /* set once the reply would exceed AGENT_MAX_PAYLOAD */
} writer_t;

int rd_u8(reader_t *r, uint8_t *out);
int rd_u16(reader_t *r, uint16_t *out);
int rd_u32(reader_t *r, uint32_t *out);
int rd_u64(reader_t *r, uint64_t *out);
int rd_bytes(reader_t *r, size_t n, const uint8_t **out);
size_t rd_left(const reader_t *r);

uint8_t *wr_reserve(writer_t *w, size_t n);
void wr_u8(writer_t *w, uint8_t v);
void wr_u16(writer_t *w, uint16_t v);
void wr_u32(writer_t *w, uint32_t v);
void wr_u64(writer_t *w, uint64_t v);
void wr_bytes(writer_t *w, const void *data, size_t n);
void wr_str(writer_t *w, const char *s);
void wr_wstr(writer_t *w, const WCHAR *s);

/* ------------------------------------------------------------------------
 * One request in flight and its error, if any
 * --------------------------------------------------------------------- */
typedef struct {
    uint16_t opcode;
    uint32_t request_id;
    reader_t in;
    writer_t out;

    uint16_t status;
    DWORD win32_error;
    DWORD thread_id;
    uint64_t address;
    char call[64];
    char message[256];
    uint8_t data[AGENT_MAX_WRITE];
    size_t data_len;
} request_t;

int fail(request_t *rq, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Records GetLastError() first, so call it right after the failing call. */
int fail_win32(request_t *rq, const char *call, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
int bad_payload(request_t *rq, const char *what);
/* The payload must have been consumed exactly. */
int expect_end(request_t *rq);

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

int op_list_processes(request_t *rq);
int op_list_modules(request_t *rq);
int op_process_info(request_t *rq);
int op_open(request_t *rq);
int op_close(request_t *rq);
int op_threads(request_t *rq);

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

int op_read(request_t *rq);
int op_write(request_t *rq);
int op_query(request_t *rq);
int op_alloc_near(request_t *rq);
int op_free(request_t *rq);
int op_protect(request_t *rq);
int op_flush(request_t *rq);

/* ------------------------------------------------------------------------
 * Freezing threads and committing (freeze.c), remote calls (remote.c)
 * --------------------------------------------------------------------- */
int op_thread_contexts(request_t *rq);
int op_commit(request_t *rq);
int op_floor(request_t *rq);
int op_remote_call(request_t *rq);

/* main.c */
int op_hello(request_t *rq);

#endif
