/*
 * requests.c: parse_request, the one place a request payload is read. Each
 * opcode's parser reads its fields, bounds every count and size, and refuses
 * any address range that leaves the user address space or wraps around, so
 * no handler ever loops over pages up to 2^64 (a WRITE at
 * 0xFFFFFFFFFFFFFFF0 once did). Portable C99: see wire.h.
 */
#include "wire.h"

#include <stdlib.h>
#include <string.h>

int check_range(request_t *rq, const user_space_t *space, const char *what, uint64_t address,
                uint64_t size)
{
    /* size - 1 <= highest - address: the last byte is in range, without overflow */
    if (size == 0 || address < space->lowest || address > space->highest ||
        size - 1 > space->highest - address)
        return fail(rq, ST_BAD_PAYLOAD,
                    "%s range 0x%llx+0x%llx is outside the user address space [0x%llx, 0x%llx]",
                    what, (unsigned long long)address, (unsigned long long)size,
                    (unsigned long long)space->lowest, (unsigned long long)space->highest);
    return ST_OK;
}

static int need(request_t *rq, int ok, const char *what)
{
    if (!ok)
        return bad_payload(rq, what);
    return expect_end(rq);
}

static int known_flags(request_t *rq, const char *what, uint32_t flags, uint32_t known)
{
    if (flags & ~known)
        return fail(rq, ST_BAD_PAYLOAD, "unknown %s flags 0x%lx", what, (unsigned long)flags);
    return ST_OK;
}

/* ------------------------------------------------------------------------
 * One parser per request shape
 * --------------------------------------------------------------------- */
static int parse_pid(request_t *rq, args_t *a, const char *what)
{
    return need(rq, rd_u32(&rq->in, &a->pid), what);
}

static int parse_read(request_t *rq, const user_space_t *space, args_t *a)
{
    uint32_t size;
    if (need(rq, rd_u32(&rq->in, &a->handle) && rd_u32(&rq->in, &size) && rd_u64(&rq->in, &a->address),
             "READ needs handle, u32 size, u64 address"))
        return rq->status;
    if (size == 0 || size > AGENT_MAX_PAYLOAD)
        return fail(rq, ST_BAD_PAYLOAD, "READ size %lu out of range", (unsigned long)size);
    a->size = size;
    return check_range(rq, space, "READ", a->address, a->size);
}

static int parse_write(request_t *rq, const user_space_t *space, args_t *a)
{
    if (!rd_u32(&rq->in, &a->handle) || !rd_u64(&rq->in, &a->address))
        return bad_payload(rq, "WRITE needs handle, u64 address, bytes");
    a->size = rd_left(&rq->in);
    if (a->size == 0)
        return bad_payload(rq, "WRITE needs at least one byte");
    rd_bytes(&rq->in, (size_t)a->size, &a->data);
    return check_range(rq, space, "WRITE", a->address, a->size);
}

static int parse_alloc_near(request_t *rq, const user_space_t *space, args_t *a)
{
    if (need(rq, rd_u32(&rq->in, &a->handle) && rd_u32(&rq->in, &a->protect) &&
                 rd_u64(&rq->in, &a->address) && rd_u64(&rq->in, &a->size) &&
                 rd_u64(&rq->in, &a->distance),
             "ALLOC_NEAR needs handle, u32 protect, u64 anchor, u64 size, u64 max_distance"))
        return rq->status;
    if (a->size == 0 || a->size > AGENT_MAX_REGION)
        return fail(rq, ST_BAD_PAYLOAD, "allocation size 0x%llx out of range",
                    (unsigned long long)a->size);
    if (a->distance == 0)
        a->distance = AGENT_DEFAULT_DISTANCE;
    if (a->distance > AGENT_MAX_DISTANCE)
        return fail(rq, ST_BAD_PAYLOAD, "max_distance 0x%llx above 2 GiB",
                    (unsigned long long)a->distance);
    /* near = 0: anywhere; else the anchor itself must be a user address */
    return a->address ? check_range(rq, space, "ALLOC_NEAR anchor", a->address, 1) : ST_OK;
}

static int parse_protect(request_t *rq, const user_space_t *space, args_t *a)
{
    if (need(rq, rd_u32(&rq->in, &a->handle) && rd_u32(&rq->in, &a->protect) &&
                 rd_u64(&rq->in, &a->address) && rd_u64(&rq->in, &a->size),
             "PROTECT needs handle, u32 protect, u64 address, u64 size"))
        return rq->status;
    if (a->size == 0 || a->size > AGENT_MAX_REGION)
        return fail(rq, ST_BAD_PAYLOAD, "PROTECT size 0x%llx out of range", (unsigned long long)a->size);
    return check_range(rq, space, "PROTECT", a->address, a->size);
}

static int parse_flush(request_t *rq, const user_space_t *space, args_t *a)
{
    if (need(rq, rd_u32(&rq->in, &a->handle) && rd_u64(&rq->in, &a->address) && rd_u64(&rq->in, &a->size),
             "FLUSH needs handle, u64 address, u64 size"))
        return rq->status;
    if (a->size > AGENT_MAX_REGION)
        return fail(rq, ST_BAD_PAYLOAD, "FLUSH size 0x%llx out of range", (unsigned long long)a->size);
    return a->size ? check_range(rq, space, "FLUSH", a->address, a->size) : ST_OK;
}

static int parse_thread_contexts(request_t *rq, const user_space_t *space, args_t *a)
{
    if (need(rq, rd_u32(&rq->in, &a->handle) && rd_u32(&rq->in, &a->flags) &&
                 rd_u64(&rq->in, &a->address) && rd_u64(&rq->in, &a->size),
             "THREAD_CONTEXTS needs handle, flags, u64 watch address, u64 watch size"))
        return rq->status;
    if (known_flags(rq, "THREAD_CONTEXTS", a->flags, FREEZE_PER_THREAD))
        return rq->status;
    return a->size ? check_range(rq, space, "THREAD_CONTEXTS watch", a->address, a->size) : ST_OK;
}

static int parse_remote_call(request_t *rq, args_t *a)
{
    if (need(rq, rd_u32(&rq->in, &a->handle) && rd_u32(&rq->in, &a->flags) &&
                 rd_u32(&rq->in, &a->timeout_ms) && rd_u64(&rq->in, &a->address) &&
                 rd_u64(&rq->in, &a->argument),
             "REMOTE_CALL needs handle, u32 flags, u32 timeout_ms, u64 function, u64 argument"))
        return rq->status;
    if (known_flags(rq, "REMOTE_CALL", a->flags, CALL_NO_WAIT))
        return rq->status;
    if (a->address == 0)
        return fail(rq, ST_BAD_PAYLOAD, "REMOTE_CALL of address 0");
    if (a->timeout_ms == 0)
        a->timeout_ms = AGENT_DEFAULT_TIMEOUT_MS;
    if (a->timeout_ms > AGENT_MAX_TIMEOUT_MS)
        return fail(rq, ST_BAD_PAYLOAD, "timeout %lu ms above %u", (unsigned long)a->timeout_ms,
                    AGENT_MAX_TIMEOUT_MS);
    return ST_OK;
}

static int parse_floor(request_t *rq, args_t *a)
{
    if (need(rq, rd_u32(&rq->in, &a->handle) && rd_u32(&rq->in, &a->flags), "FLOOR needs handle, flags"))
        return rq->status;
    return known_flags(rq, "FLOOR", a->flags, FREEZE_PER_THREAD);
}

/* ------------------------------------------------------------------------
 * COMMIT
 * --------------------------------------------------------------------- */
int cwrite_compare(const void *a, const void *b)
{
    const cwrite_t *x = *(const cwrite_t *const *)a, *y = *(const cwrite_t *const *)b;
    return (x->address > y->address) - (x->address < y->address);
}

static int parse_writes(request_t *rq, const user_space_t *space, args_t *a)
{
    const cwrite_t **sorted;
    uint32_t i;

    for (i = 0; i < a->count; i++) {
        cwrite_t *w = &a->writes[i];
        uint8_t flags, reserved;
        if (!rd_u64(&rq->in, &w->address) || !rd_u16(&rq->in, &w->length) ||
            !rd_u8(&rq->in, &flags) || !rd_u8(&rq->in, &reserved))
            return bad_payload(rq, "COMMIT write header truncated");
        if (w->length == 0 || w->length > AGENT_MAX_WRITE)
            return fail(rq, ST_BAD_PAYLOAD, "write %lu: length %u not in 1..%u", (unsigned long)i,
                        (unsigned)w->length, AGENT_MAX_WRITE);
        if ((flags & ~WRITE_NO_SUSPEND) || reserved)
            return fail(rq, ST_BAD_PAYLOAD, "write %lu: unknown flags 0x%x", (unsigned long)i,
                        (unsigned)flags);
        if (check_range(rq, space, "COMMIT write", w->address, w->length))
            return rq->status;
        w->no_suspend = flags & WRITE_NO_SUSPEND;
        if (!rd_bytes(&rq->in, w->length, &w->expected) ||
            !rd_bytes(&rq->in, w->length, &w->replacement))
            return bad_payload(rq, "COMMIT write bytes truncated");
    }
    if (expect_end(rq))
        return rq->status;

    /* Overlapping writes would make "expected" and undo ill-defined. */
    sorted = malloc(a->count * sizeof *sorted);
    if (!sorted)
        return fail(rq, ST_LIMIT, "out of memory sorting writes");
    for (i = 0; i < a->count; i++)
        sorted[i] = &a->writes[i];
    qsort(sorted, a->count, sizeof *sorted, cwrite_compare);
    for (i = 1; i < a->count; i++) {
        if (sorted[i - 1]->address + sorted[i - 1]->length > sorted[i]->address) {
            uint64_t at = sorted[i]->address;
            free(sorted);
            return fail(rq, ST_BAD_PAYLOAD, "writes overlap at 0x%llx", (unsigned long long)at);
        }
    }
    free(sorted);
    return ST_OK;
}

static int parse_commit(request_t *rq, const user_space_t *space, args_t *a)
{
    if (!rd_u32(&rq->in, &a->handle) || !rd_u32(&rq->in, &a->flags) ||
        !rd_u32(&rq->in, &a->max_attempts) || !rd_u32(&rq->in, &a->retry_ms) ||
        !rd_u32(&rq->in, &a->count))
        return bad_payload(rq, "COMMIT needs handle, flags, max_attempts, retry_sleep_ms, count");
    if (known_flags(rq, "COMMIT", a->flags, FREEZE_PER_THREAD))
        return rq->status;
    if (a->max_attempts == 0 || a->max_attempts > AGENT_MAX_ATTEMPTS)
        return fail(rq, ST_BAD_PAYLOAD, "max_attempts %lu not in 1..%u", (unsigned long)a->max_attempts,
                    AGENT_MAX_ATTEMPTS);
    if (a->retry_ms > AGENT_MAX_RETRY_SLEEP_MS)
        return fail(rq, ST_BAD_PAYLOAD, "retry_sleep_ms %lu above %u", (unsigned long)a->retry_ms,
                    AGENT_MAX_RETRY_SLEEP_MS);
    if (a->count == 0 || a->count > AGENT_MAX_WRITES)
        return fail(rq, ST_BAD_PAYLOAD, "write count %lu not in 1..%u", (unsigned long)a->count,
                    AGENT_MAX_WRITES);
    /* Each write needs at least 14 payload bytes, so this bounds the allocation. */
    if ((size_t)a->count * 14u > rd_left(&rq->in))
        return bad_payload(rq, "COMMIT write count larger than the payload");
    a->writes = calloc(a->count, sizeof *a->writes);
    if (!a->writes)
        return fail(rq, ST_LIMIT, "out of memory for %lu writes", (unsigned long)a->count);
    if (parse_writes(rq, space, a)) {
        args_free(a);
        return rq->status;
    }
    return ST_OK;
}

/* ------------------------------------------------------------------------
 * Dispatch on the opcode
 * --------------------------------------------------------------------- */
int parse_request(request_t *rq, const user_space_t *space, args_t *a)
{
    reader_t *in = &rq->in;

    memset(a, 0, sizeof *a);
    switch (rq->opcode) {
    case OP_HELLO:
    case OP_LIST_PROCESSES:
        return expect_end(rq);
    case OP_LIST_MODULES:
        return parse_pid(rq, a, "LIST_MODULES needs a u32 pid");
    case OP_PROCESS_INFO:
        return parse_pid(rq, a, "PROCESS_INFO needs a u32 pid");
    case OP_OPEN:
        return parse_pid(rq, a, "OPEN needs a u32 pid");
    case OP_THREADS:
        return parse_pid(rq, a, "THREADS needs a u32 pid");
    case OP_CLOSE:
        return need(rq, rd_u32(in, &a->handle), "CLOSE needs a u32 handle");
    case OP_READ:
        return parse_read(rq, space, a);
    case OP_WRITE:
        return parse_write(rq, space, a);
    case OP_QUERY:
        return need(rq, rd_u32(in, &a->handle) && rd_u64(in, &a->address), "QUERY needs handle, u64 address");
    case OP_ALLOC_NEAR:
        return parse_alloc_near(rq, space, a);
    case OP_FREE:
        return need(rq, rd_u32(in, &a->handle) && rd_u64(in, &a->address), "FREE needs handle, u64 address");
    case OP_PROTECT:
        return parse_protect(rq, space, a);
    case OP_FLUSH:
        return parse_flush(rq, space, a);
    case OP_THREAD_CONTEXTS:
        return parse_thread_contexts(rq, space, a);
    case OP_REMOTE_CALL:
        return parse_remote_call(rq, a);
    case OP_COMMIT:
        return parse_commit(rq, space, a);
    case OP_FLOOR:
        return parse_floor(rq, a);
    default:
        return fail(rq, ST_UNKNOWN_OPCODE, "unknown opcode 0x%04x", (unsigned)rq->opcode);
    }
}

int request_parse(request_t *rq, uint16_t version, const user_space_t *space, args_t *a)
{
    memset(a, 0, sizeof *a);
    if (version != AGENT_PROTOCOL_VERSION)
        return fail(rq, ST_BAD_VERSION, "protocol version %u not supported (agent speaks %u)",
                    (unsigned)version, (unsigned)AGENT_PROTOCOL_VERSION);
    return parse_request(rq, space, a);
}

void args_free(args_t *a)
{
    free(a->writes);
    a->writes = NULL;
    a->count = 0;
}
