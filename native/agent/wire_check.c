/*
 * wire_check: the agent's request parser (wire.c, requests.c) as a native
 * program, for the protocol fuzz (tests/fuzz_agent.py) under ASan/UBSan.
 *
 *   wire_check [--space LOWEST HIGHEST] < cases
 *       cases: u32 size + that many bytes (a frame: 12-byte header, payload), repeated.
 *       Per case one line: "<status> <reply frame hex> <arguments>", where the
 *       arguments (of an accepted request) are the fields of args_t in order,
 *       in hex: pid handle flags protect address size distance argument
 *       timeout_ms max_attempts retry_ms count, then "data=<hex>" for WRITE or
 *       one "w=<address>:<length>:<no_suspend>:<expected>:<new>" per COMMIT write.
 *       Each payload is copied into a buffer of exactly its size, so reading
 *       one byte past it is an ASan report.
 *   wire_check --selftest
 *       A reply whose count slot is filled in after the buffer moved many
 *       times (the LIST_MODULES use after free), and the writer's limits.
 *
 * Exit status 0; 1 on a malformed case stream or a failed self-test.
 */
#include "wire.h"

#include <stdlib.h>
#include <string.h>

static void hex(const uint8_t *p, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++)
        printf("%02x", p[i]);
}

static void dump_args(const args_t *a, uint16_t opcode)
{
    uint32_t i;
    printf(" %x %x %x %x %llx %llx %llx %llx %x %x %x %x", a->pid, a->handle, a->flags, a->protect,
           (unsigned long long)a->address, (unsigned long long)a->size,
           (unsigned long long)a->distance, (unsigned long long)a->argument, a->timeout_ms,
           a->max_attempts, a->retry_ms, a->count);
    if (opcode == OP_WRITE) {
        printf(" data=");
        hex(a->data, (size_t)a->size);
    }
    for (i = 0; i < a->count; i++) {
        const cwrite_t *w = &a->writes[i];
        printf(" w=%llx:%x:%x:", (unsigned long long)w->address, w->length, w->no_suspend);
        hex(w->expected, w->length);
        putchar(':');
        hex(w->replacement, w->length);
    }
}

/* One frame through what the request loop does before a handler runs. */
static void run_case(request_t *rq, const user_space_t *space, const uint8_t *frame, size_t size)
{
    frame_header_t h;
    args_t args;
    uint8_t *payload = NULL;
    size_t length;

    if (size < AGENT_HEADER_SIZE) {
        printf("short\n");
        return;
    }
    frame_header_decode(frame, &h);
    if (!frame_begin(rq, h.opcode, h.request_id)) {
        printf("oom\n");
        return;
    }
    length = size - AGENT_HEADER_SIZE; /* what arrived; the loop reads h.length */
    memset(&args, 0, sizeof args);
    if (h.length > AGENT_MAX_PAYLOAD) {
        fail(rq, ST_BAD_FRAME, "frame payload of %lu bytes exceeds the maximum", (unsigned long)h.length);
    } else if (h.length != length) {
        fail(rq, ST_BAD_PAYLOAD, "case length %lu differs from the header's %lu", (unsigned long)length,
             (unsigned long)h.length);
    } else {
        payload = length ? malloc(length) : NULL;
        if (length && !payload) {
            printf("oom\n");
            return;
        }
        if (length)
            memcpy(payload, frame + AGENT_HEADER_SIZE, length);
        rq->in.data = payload;
        rq->in.size = length;
        rq->in.pos = 0;
        request_parse(rq, h.version, space, &args);
    }
    frame_finish(rq);
    printf("%u ", (unsigned)rq->status);
    hex(rq->out.data, rq->out.size);
    if (rq->status == ST_OK)
        dump_args(&args, h.opcode);
    putchar('\n');
    args_free(&args);
    free(payload);
    rq->in.data = NULL;
}

static int selftest(void)
{
    static request_t rq;
    uint32_t i, entries = 100000;
    size_t slot;
    uint8_t *first;

    if (!frame_begin(&rq, OP_LIST_MODULES, 7))
        return 1;
    slot = wr_slot_u32(&rq.out);
    first = rq.out.data;
    for (i = 0; i < entries; i++) {
        wr_u64(&rq.out, 0x140000000ull + i * 0x10000ull);
        wr_u32(&rq.out, 0x10000);
        wr_str(&rq.out, "module.dll");
        wr_str(&rq.out, "C:\\windows\\system32\\module.dll");
    }
    wr_put_u32_at(&rq.out, slot, entries);
    frame_finish(&rq);
    if (rq.status != ST_OK || load_le(rq.out.data + AGENT_HEADER_SIZE, 4) != entries) {
        fprintf(stderr, "selftest: count slot lost (status %u)\n", (unsigned)rq.status);
        return 1;
    }
    printf("selftest: %lu entries, %lu bytes, buffer %s\n", (unsigned long)entries,
           (unsigned long)rq.out.size, rq.out.data == first ? "stayed" : "moved");

    /* A reply past the limit becomes LIMIT, and a slot past the end is ignored. */
    if (!frame_begin(&rq, OP_READ, 8))
        return 1;
    if (wr_reserve(&rq.out, AGENT_MAX_PAYLOAD + 1) != NULL || !rq.out.overflow)
        return fprintf(stderr, "selftest: oversized reply accepted\n"), 1;
    wr_put_u32_at(&rq.out, 1u << 30, 1);
    frame_finish(&rq);
    if (rq.status != ST_LIMIT)
        return fprintf(stderr, "selftest: oversized reply gave status %u\n", (unsigned)rq.status), 1;
    wr_free(&rq.out);
    printf("selftest: ok\n");
    return 0;
}

int main(int argc, char **argv)
{
    static request_t rq;
    user_space_t space = {0x10000ull, 0x7FFFFFFEFFFFull}; /* x64 Windows */
    uint8_t size_le[4];
    uint8_t *frame = NULL;

    if (argc == 2 && strcmp(argv[1], "--selftest") == 0)
        return selftest();
    if (argc == 4 && strcmp(argv[1], "--space") == 0) {
        space.lowest = strtoull(argv[2], NULL, 0);
        space.highest = strtoull(argv[3], NULL, 0);
    } else if (argc != 1) {
        fprintf(stderr, "usage: wire_check [--space LOWEST HIGHEST] < cases | wire_check --selftest\n");
        return 2;
    }
    while (fread(size_le, 1, 4, stdin) == 4) {
        size_t size = (size_t)load_le(size_le, 4);
        if (size > AGENT_HEADER_SIZE + AGENT_MAX_PAYLOAD)
            return fprintf(stderr, "case of %lu bytes is too large\n", (unsigned long)size), 1;
        frame = malloc(size ? size : 1);
        if (!frame || fread(frame, 1, size, stdin) != size)
            return fprintf(stderr, "truncated case stream\n"), 1;
        run_case(&rq, &space, frame, size);
        free(frame);
    }
    wr_free(&rq.out);
    return 0;
}
