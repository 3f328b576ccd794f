/*
 * wire.c: the bounded reader and writer, error records, and frame headers
 * and replies. Portable C99: see wire.h.
 */
#include "wire.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

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

uint64_t load_le(const uint8_t *p, size_t n)
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
    if (w->size > AGENT_HEADER_SIZE + AGENT_MAX_PAYLOAD ||
        n > AGENT_HEADER_SIZE + AGENT_MAX_PAYLOAD - w->size) {
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

static void put_le(uint8_t *p, uint64_t v, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++, v >>= 8)
        p[i] = (uint8_t)(v & 0xFF);
}

static void store_le(writer_t *w, uint64_t v, size_t n)
{
    uint8_t *p = wr_reserve(w, n);
    if (p)
        put_le(p, v, n);
}

size_t wr_slot_u32(writer_t *w)
{
    size_t slot = w->size;
    return wr_reserve(w, 4) ? slot : WR_NO_SLOT;
}

void wr_put_u32_at(writer_t *w, size_t slot, uint32_t value)
{
    if (slot != WR_NO_SLOT && !w->overflow && slot <= w->size && w->size - slot >= 4)
        put_le(w->data + slot, value, 4);
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

void wr_free(writer_t *w)
{
    free(w->data);
    w->data = NULL;
    w->size = w->cap = 0;
    w->overflow = 0;
}

/* ------------------------------------------------------------------------
 * Errors
 * --------------------------------------------------------------------- */
static int vfail(request_t *rq, int status, const char *call, uint32_t error, const char *fmt,
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

int fail_call(request_t *rq, const char *call, uint32_t error, const char *fmt, ...)
{
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
 * Frames
 * --------------------------------------------------------------------- */
void frame_header_decode(const uint8_t header[AGENT_HEADER_SIZE], frame_header_t *h)
{
    h->length = (uint32_t)load_le(header, 4);
    h->opcode = (uint16_t)load_le(header + 4, 2);
    h->version = (uint16_t)load_le(header + 6, 2);
    h->request_id = (uint32_t)load_le(header + 8, 4);
}

int frame_begin(request_t *rq, uint16_t opcode, uint32_t request_id)
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
    return wr_reserve(&rq->out, AGENT_HEADER_SIZE) != NULL;
}

/* Replaces whatever the handler wrote with the error payload. */
static void build_error(request_t *rq)
{
    writer_t *w = &rq->out;
    size_t data_len = rq->data_len < sizeof rq->data ? rq->data_len : sizeof rq->data;
    w->size = AGENT_HEADER_SIZE;
    w->overflow = 0;
    wr_u32(w, rq->win32_error);
    wr_u32(w, rq->thread_id);
    wr_u64(w, rq->address);
    wr_str(w, rq->call);
    wr_str(w, rq->message);
    wr_u16(w, (uint16_t)data_len);
    wr_bytes(w, rq->data, data_len);
}

void frame_finish(request_t *rq)
{
    uint8_t *p = rq->out.data;
    uint32_t length;
    if (rq->status == ST_OK && rq->out.overflow)
        fail(rq, ST_LIMIT, "reply larger than %lu bytes", (unsigned long)AGENT_MAX_PAYLOAD);
    if (rq->status != ST_OK)
        build_error(rq);
    p = rq->out.data;
    length = (uint32_t)(rq->out.size - AGENT_HEADER_SIZE);
    put_le(p, length, 4);
    put_le(p + 4, rq->opcode, 2);
    put_le(p + 6, rq->status, 2);
    put_le(p + 8, rq->request_id, 4);
}
