/*
 * protocol.c: framing on stdin/stdout, the bounded reader and writer, and
 * error replies. See docs/AGENT.md for the wire format.
 */
#include "agent.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

int dispatch(request_t *rq);

/* ------------------------------------------------------------------------
 * Reader: every accessor fails (returns 0) instead of reading past the end.
 * --------------------------------------------------------------------- */
size_t rd_left(const reader_t *r)
{
    return r->size - r->pos;
}

int rd_bytes(reader_t *r, size_t n, const uint8_t **out)
{
    if (rd_left(r) < n)
        return 0;
    *out = r->data + r->pos;
    r->pos += n;
    return 1;
}

static uint64_t load_le(const uint8_t *p, size_t n)
{
    uint64_t v = 0;
    size_t i;
    for (i = n; i > 0; i--)
        v = (v << 8) | p[i - 1];
    return v;
}

int rd_u8(reader_t *r, uint8_t *out)
{
    const uint8_t *p;
    if (!rd_bytes(r, 1, &p))
        return 0;
    *out = p[0];
    return 1;
}

int rd_u16(reader_t *r, uint16_t *out)
{
    const uint8_t *p;
    if (!rd_bytes(r, 2, &p))
        return 0;
    *out = (uint16_t)load_le(p, 2);
    return 1;
}

int rd_u32(reader_t *r, uint32_t *out)
{
    const uint8_t *p;
    if (!rd_bytes(r, 4, &p))
        return 0;
    *out = (uint32_t)load_le(p, 4);
    return 1;
}

int rd_u64(reader_t *r, uint64_t *out)
{
    const uint8_t *p;
    if (!rd_bytes(r, 8, &p))
        return 0;
    *out = load_le(p, 8);
    return 1;
}

/* ------------------------------------------------------------------------
 * Writer: grows up to header + AGENT_MAX_PAYLOAD, then sets overflow and
 * drops further output (the reply becomes a LIMIT error).
 * --------------------------------------------------------------------- */
uint8_t *wr_reserve(writer_t *w, size_t n)
{
    uint8_t *p;
    if (w->overflow)
        return NULL;
    if (n > AGENT_HEADER_SIZE + AGENT_MAX_PAYLOAD - w->size) {
        w->overflow = 1;
        return NULL;
    }
    if (w->size + n > w->cap) {
        size_t cap = w->cap ? w->cap : 4096;
        uint8_t *grown;
        while (cap < w->size + n)
            cap *= 2;
        grown = realloc(w->data, cap);
        if (!grown) {
            w->overflow = 1;
            return NULL;
        }
        w->data = grown;
        w->cap = cap;
    }
    p = w->data + w->size;
    w->size += n;
    return p;
}

static void store_le(writer_t *w, uint64_t v, size_t n)
{
    uint8_t *p = wr_reserve(w, n);
    size_t i;
    if (!p)
        return;
    for (i = 0; i < n; i++, v >>= 8)
        p[i] = (uint8_t)(v & 0xFF);
}

void wr_u8(writer_t *w, uint8_t v) { store_le(w, v, 1); }
void wr_u16(writer_t *w, uint16_t v) { store_le(w, v, 2); }
void wr_u32(writer_t *w, uint32_t v) { store_le(w, v, 4); }
void wr_u64(writer_t *w, uint64_t v) { store_le(w, v, 8); }

void wr_bytes(writer_t *w, const void *data, size_t n)
{
    uint8_t *p = wr_reserve(w, n);
    if (p && n)
        memcpy(p, data, n);
}

void wr_str(writer_t *w, const char *s)
{
    size_t n = strlen(s);
    if (n > 0xFFFF)
        n = 0xFFFF;
    wr_u16(w, (uint16_t)n);
    wr_bytes(w, s, n);
}

void wr_wstr(writer_t *w, const WCHAR *s)
{
    char buf[8 * MAX_PATH]; /* UTF-8 of up to 2 * MAX_PATH UTF-16 units */
    int n = WideCharToMultiByte(CP_UTF8, 0, s, -1, buf, (int)sizeof buf, NULL, NULL);
    if (n <= 0)
        buf[0] = '\0';
    wr_str(w, buf);
}

/* ------------------------------------------------------------------------
 * Errors
 * --------------------------------------------------------------------- */
static int vfail(request_t *rq, int status, const char *call, DWORD error, const char *fmt,
                 va_list ap)
{
    rq->status = (uint16_t)status;
    rq->win32_error = error;
    snprintf(rq->call, sizeof rq->call, "%s", call ? call : "");
    vsnprintf(rq->message, sizeof rq->message, fmt, ap);
    TRACE("request %lu failed: status %d %s %lu %s", (unsigned long)rq->request_id, status,
          rq->call, (unsigned long)error, rq->message);
    return status;
}

int fail(request_t *rq, int status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfail(rq, status, NULL, 0, fmt, ap);
    va_end(ap);
    return status;
}

int fail_win32(request_t *rq, const char *call, const char *fmt, ...)
{
    DWORD error = GetLastError();
    va_list ap;
    va_start(ap, fmt);
    vfail(rq, ST_WIN32, call, error, fmt, ap);
    va_end(ap);
    return ST_WIN32;
}

int bad_payload(request_t *rq, const char *what)
{
    return fail(rq, ST_BAD_PAYLOAD, "malformed request: %s", what);
}

int expect_end(request_t *rq)
{
    if (rd_left(&rq->in) != 0)
        return bad_payload(rq, "trailing bytes after the request");
    return ST_OK;
}

/* ------------------------------------------------------------------------
 * Pipe I/O
 * --------------------------------------------------------------------- */
static int read_exact(HANDLE in, uint8_t *buf, size_t n)
{
    while (n > 0) {
        DWORD chunk = n > 0x100000 ? 0x100000 : (DWORD)n;
        DWORD got = 0;
        if (!ReadFile(in, buf, chunk, &got, NULL) || got == 0)
            return 0;
        buf += got;
        n -= got;
    }
    return 1;
}

static int write_all(HANDLE out, const uint8_t *buf, size_t n)
{
    while (n > 0) {
        DWORD chunk = n > 0x100000 ? 0x100000 : (DWORD)n;
        DWORD put = 0;
        if (!WriteFile(out, buf, chunk, &put, NULL) || put == 0)
            return 0;
        buf += put;
        n -= put;
    }
    return 1;
}

/* Streams away a payload too large to hold, to stay in step with the client. */
static int discard(HANDLE in, uint64_t n)
{
    static uint8_t sink[65536];
    while (n > 0) {
        size_t chunk = n > sizeof sink ? sizeof sink : (size_t)n;
        if (!read_exact(in, sink, chunk))
            return 0;
        n -= chunk;
    }
    return 1;
}

static void put_header(uint8_t *p, uint32_t length, uint16_t opcode, uint16_t status,
                       uint32_t request_id)
{
    int i;
    for (i = 0; i < 4; i++)
        p[i] = (uint8_t)(length >> (8 * i));
    p[4] = (uint8_t)opcode;
    p[5] = (uint8_t)(opcode >> 8);
    p[6] = (uint8_t)status;
    p[7] = (uint8_t)(status >> 8);
    for (i = 0; i < 4; i++)
        p[8 + i] = (uint8_t)(request_id >> (8 * i));
}

/* Replaces whatever the handler wrote with the error payload. */
static void build_error(request_t *rq)
{
    writer_t *w = &rq->out;
    w->size = AGENT_HEADER_SIZE;
    w->overflow = 0;
    wr_u32(w, rq->win32_error);
    wr_u32(w, rq->thread_id);
    wr_u64(w, rq->address);
    wr_str(w, rq->call);
    wr_str(w, rq->message);
    wr_u16(w, (uint16_t)rq->data_len);
    wr_bytes(w, rq->data, rq->data_len);
}

static int send_reply(HANDLE out, request_t *rq)
{
    if (rq->status != ST_OK)
        build_error(rq);
    put_header(rq->out.data, (uint32_t)(rq->out.size - AGENT_HEADER_SIZE), rq->opcode,
               rq->status, rq->request_id);
    return write_all(out, rq->out.data, rq->out.size);
}

static void reset(request_t *rq, uint16_t opcode, uint32_t request_id)
{
    rq->opcode = opcode;
    rq->request_id = request_id;
    rq->status = ST_OK;
    rq->win32_error = 0;
    rq->thread_id = 0;
    rq->address = 0;
    rq->call[0] = '\0';
    rq->message[0] = '\0';
    rq->data_len = 0;
    rq->out.size = 0;
    rq->out.overflow = 0;
    wr_reserve(&rq->out, AGENT_HEADER_SIZE);
}

/* ------------------------------------------------------------------------
 * The request loop: one frame in, one reply out, until stdin closes.
 * --------------------------------------------------------------------- */
int protocol_serve(void)
{
    static request_t rq;
    HANDLE in = GetStdHandle(STD_INPUT_HANDLE);
    HANDLE out = GetStdHandle(STD_OUTPUT_HANDLE);
    uint8_t header[AGENT_HEADER_SIZE];

    for (;;) {
        uint32_t length, request_id;
        uint16_t opcode, version;
        uint8_t *payload = NULL;
        int ok;

        if (!read_exact(in, header, sizeof header))
            return 0; /* stdin closed: the client is done */
        length = (uint32_t)load_le(header, 4);
        opcode = (uint16_t)load_le(header + 4, 2);
        version = (uint16_t)load_le(header + 6, 2);
        request_id = (uint32_t)load_le(header + 8, 4);
        reset(&rq, opcode, request_id);
        if (!rq.out.data)
            return 3; /* cannot even hold a header: out of memory */

        if (length > AGENT_MAX_PAYLOAD) {
            fail(&rq, ST_BAD_FRAME, "frame payload of %lu bytes exceeds the maximum of %lu",
                 (unsigned long)length, (unsigned long)AGENT_MAX_PAYLOAD);
            if (!send_reply(out, &rq) || !discard(in, length))
                return 0;
            continue;
        }
        if (length) {
            payload = malloc(length);
            if (!payload) {
                fail(&rq, ST_LIMIT, "cannot allocate %lu bytes for the request",
                     (unsigned long)length);
                if (!send_reply(out, &rq) || !discard(in, length))
                    return 0;
                continue;
            }
            if (!read_exact(in, payload, length)) {
                free(payload);
                return 0;
            }
        }
        rq.in.data = payload;
        rq.in.size = length;
        rq.in.pos = 0;

        if (version != AGENT_PROTOCOL_VERSION)
            fail(&rq, ST_BAD_VERSION, "protocol version %u not supported (agent speaks %u)",
                 (unsigned)version, (unsigned)AGENT_PROTOCOL_VERSION);
        else if (dispatch(&rq) == ST_OK && rq.out.overflow)
            fail(&rq, ST_LIMIT, "reply larger than %lu bytes", (unsigned long)AGENT_MAX_PAYLOAD);
        free(payload);
        rq.in.data = NULL;

        ok = send_reply(out, &rq);
        if (rq.out.cap > (1u << 20)) {
            /* Do not keep a large READ's buffer around for the next request. */
            free(rq.out.data);
            rq.out.data = NULL;
            rq.out.cap = 0;
        }
        if (!ok)
            return 0;
    }
}
