/*
 * protocol.c: frames on stdin/stdout and the request loop, plus the Win32
 * parts of replies (wide strings, GetLastError). The wire format itself is
 * in wire.c and requests.c; see docs/AGENT.md.
 */
#include "agent.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

int dispatch(request_t *rq, const args_t *args);

/* ------------------------------------------------------------------------
 * The Win32 parts of replies and errors
 * --------------------------------------------------------------------- */
void wr_wstr(writer_t *w, const WCHAR *s)
{
    char buf[8 * MAX_PATH]; /* UTF-8 of up to 2 * MAX_PATH UTF-16 units */
    int n = WideCharToMultiByte(CP_UTF8, 0, s, -1, buf, (int)sizeof buf, NULL, NULL);
    if (n <= 0)
        buf[0] = '\0';
    wr_str(w, buf);
}

int fail_win32(request_t *rq, const char *call, const char *fmt, ...)
{
    DWORD error = GetLastError();
    char detail[sizeof rq->message];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    return fail_call(rq, call, error, "%s", detail);
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

static int send_reply(HANDLE out, request_t *rq)
{
    frame_finish(rq);
    return write_all(out, rq->out.data, rq->out.size);
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
        frame_header_t h;
        args_t args;
        uint8_t *payload = NULL;
        int ok;

        if (!read_exact(in, header, sizeof header))
            return 0; /* stdin closed: the client is done */
        frame_header_decode(header, &h);
        if (!frame_begin(&rq, h.opcode, h.request_id))
            return 3; /* cannot even hold a header: out of memory */

        if (h.length > AGENT_MAX_PAYLOAD) {
            fail(&rq, ST_BAD_FRAME, "frame payload of %lu bytes exceeds the maximum of %lu",
                 (unsigned long)h.length, (unsigned long)AGENT_MAX_PAYLOAD);
            if (!send_reply(out, &rq) || !discard(in, h.length))
                return 0;
            continue;
        }
        if (h.length) {
            payload = malloc(h.length);
            if (!payload) {
                fail(&rq, ST_LIMIT, "cannot allocate %lu bytes for the request",
                     (unsigned long)h.length);
                if (!send_reply(out, &rq) || !discard(in, h.length))
                    return 0;
                continue;
            }
            if (!read_exact(in, payload, h.length)) {
                free(payload);
                return 0;
            }
        }
        rq.in.data = payload;
        rq.in.size = h.length;
        rq.in.pos = 0;

        /* Parsed and checked in full before any handler (and Win32 call) runs. */
        if (request_parse(&rq, h.version, user_space(), &args) == ST_OK) {
            dispatch(&rq, &args);
            args_free(&args);
        }
        free(payload);
        rq.in.data = NULL;

        ok = send_reply(out, &rq);
        if (rq.out.cap > (1u << 20))
            wr_free(&rq.out); /* do not keep a large READ's buffer for the next request */
        if (!ok)
            return 0;
    }
}
