/*
 * wire.h: the agent's protocol without Win32 — limits, opcodes, statuses,
 * the bounded reader and writer, errors, framing, and the parser that turns
 * a request payload into checked arguments (args_t).
 *
 * Nothing here includes <windows.h>, so the same files build natively with
 * gcc and run under AddressSanitizer/UBSan in the protocol fuzz
 * (tests/fuzz_agent.py, native/agent/wire_check.c). The Win32 handlers only
 * ever see arguments that parse_request has accepted: every size bounded,
 * every address range inside the user address space and not wrapping.
 *
 *   wire.c      reader/writer, errors, frame header and reply building
 *   requests.c  parse_request: one parser per opcode, range checks
 */
#ifndef HOTPATCH_AGENT_WIRE_H
#define HOTPATCH_AGENT_WIRE_H

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
#define AGENT_MAX_REGION (1ull << 40) /* PROTECT, FLUSH, ALLOC_NEAR sizes */
#define AGENT_DEFAULT_DISTANCE 0x7FFF0000ull /* ALLOC_NEAR: 2 GiB minus one granule */
#define AGENT_MAX_DISTANCE 0x80000000ull
#define AGENT_DEFAULT_TIMEOUT_MS 10000u /* REMOTE_CALL */
#define AGENT_MAX_TIMEOUT_MS 600000u

/* Request flags */
#define FREEZE_PER_THREAD 1u /* COMMIT, FLOOR, THREAD_CONTEXTS */
#define CALL_NO_WAIT 1u      /* REMOTE_CALL */
#define WRITE_NO_SUSPEND 1u  /* a COMMIT write */

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

#define WR_NO_SLOT ((size_t)-1)

int rd_u8(reader_t *r, uint8_t *out);
int rd_u16(reader_t *r, uint16_t *out);
int rd_u32(reader_t *r, uint32_t *out);
int rd_u64(reader_t *r, uint64_t *out);
int rd_bytes(reader_t *r, size_t n, const uint8_t **out);
size_t rd_left(const reader_t *r);
uint64_t load_le(const uint8_t *p, size_t n);

/* A pointer to n new bytes, valid only until the next write (the buffer may
 * move as it grows); NULL once the reply overflowed. */
uint8_t *wr_reserve(writer_t *w, size_t n);
/* A field to fill in later (a count written before its entries): an offset,
 * which stays valid as the buffer moves, unlike a pointer. */
size_t wr_slot_u32(writer_t *w);
void wr_put_u32_at(writer_t *w, size_t slot, uint32_t value);
void wr_u8(writer_t *w, uint8_t v);
void wr_u16(writer_t *w, uint16_t v);
void wr_u32(writer_t *w, uint32_t v);
void wr_u64(writer_t *w, uint64_t v);
void wr_bytes(writer_t *w, const void *data, size_t n);
void wr_str(writer_t *w, const char *s);
void wr_free(writer_t *w);

/* ------------------------------------------------------------------------
 * One request in flight and its error, if any
 * --------------------------------------------------------------------- */
typedef struct {
    uint16_t opcode;
    uint32_t request_id;
    reader_t in;
    writer_t out;

    uint16_t status;
    uint32_t win32_error; /* GetLastError() or an NTSTATUS */
    uint32_t thread_id;
    uint64_t address;
    char call[64];
    char message[256];
    uint8_t data[AGENT_MAX_WRITE];
    size_t data_len;
} request_t;

int fail(request_t *rq, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Like fail with status ST_WIN32, naming the failed call and its error code. */
int fail_call(request_t *rq, const char *call, uint32_t error, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
int bad_payload(request_t *rq, const char *what);
/* The payload must have been consumed exactly. */
int expect_end(request_t *rq);

/* ------------------------------------------------------------------------
 * Framing
 * --------------------------------------------------------------------- */
typedef struct {
    uint32_t length; /* payload bytes */
    uint16_t opcode;
    uint16_t version;
    uint32_t request_id;
} frame_header_t;

void frame_header_decode(const uint8_t header[AGENT_HEADER_SIZE], frame_header_t *h);
/* Starts the reply to a request: clears the error, reserves the header.
 * 0 if not even the header can be held (out of memory). */
int frame_begin(request_t *rq, uint16_t opcode, uint32_t request_id);
/* Turns a failed request's reply into the error payload, then fills in the
 * header; rq->out.data[0..rq->out.size) is the frame to send. */
void frame_finish(request_t *rq);

/* ------------------------------------------------------------------------
 * Parsed requests
 * --------------------------------------------------------------------- */
/* The user address space of the platform: ranges must lie in [lowest, highest]. */
typedef struct {
    uint64_t lowest, highest;
} user_space_t;

typedef struct {
    uint64_t address;
    uint16_t length;
    uint8_t no_suspend;
    const uint8_t *expected;    /* into the request payload */
    const uint8_t *replacement; /* into the request payload */
} cwrite_t;

/* What each request carries (fields a request does not use stay 0). Pointers
 * point into the request payload, except writes (malloc'd: args_free). */
typedef struct {
    uint32_t pid;          /* LIST_MODULES, PROCESS_INFO, OPEN, THREADS */
    uint32_t handle;       /* every request on an open process */
    uint32_t flags;        /* THREAD_CONTEXTS, REMOTE_CALL, COMMIT, FLOOR */
    uint32_t protect;      /* ALLOC_NEAR, PROTECT */
    uint64_t address;      /* READ, WRITE, QUERY, FREE, PROTECT, FLUSH; ALLOC_NEAR's near;
                              THREAD_CONTEXTS' watch; REMOTE_CALL's function */
    uint64_t size;         /* READ, WRITE, PROTECT, FLUSH, ALLOC_NEAR; THREAD_CONTEXTS' watch */
    uint64_t distance;     /* ALLOC_NEAR (0 replaced by the default) */
    uint64_t argument;     /* REMOTE_CALL */
    uint32_t timeout_ms;   /* REMOTE_CALL (0 replaced by the default) */
    uint32_t max_attempts; /* COMMIT */
    uint32_t retry_ms;     /* COMMIT */
    const uint8_t *data;   /* WRITE: size bytes */
    cwrite_t *writes;      /* COMMIT: count writes, none overlapping */
    uint32_t count;
} args_t;

/* Parses rq->in for rq->opcode into *args; ST_OK, or the status with the
 * error recorded in rq (args then holds nothing to free). */
int parse_request(request_t *rq, const user_space_t *space, args_t *args);
/* What the request loop does with every frame that fits: the version check,
 * then parse_request. ST_OK: ready for the handler. */
int request_parse(request_t *rq, uint16_t version, const user_space_t *space, args_t *args);
void args_free(args_t *args);
/* qsort order of pointers to writes: by address. */
int cwrite_compare(const void *a, const void *b);
/* BAD_PAYLOAD unless [address, address + size) lies in the user space (size > 0). */
int check_range(request_t *rq, const user_space_t *space, const char *what, uint64_t address,
                uint64_t size);

#endif
