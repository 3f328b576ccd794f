/*
 * hpk_reader.c - checking reader of hotpatch packages (docs/FORMAT.md).
 *
 * Rules of this file:
 *  - every offset is checked against the size of what it indexes before a
 *    pointer is formed from it; arithmetic on file values is done in
 *    uint64_t, where the sum of two 32-bit values cannot wrap;
 *  - the checks run in the validation order of docs/FORMAT.md, which the
 *    Python reader (hotpatch/package/format.py and model.py) follows too;
 *  - nothing is allocated; the result points into the caller's buffer.
 */
#include "hpk_reader.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* ================================================================ sections */

enum {
    SEC_TARGET = 0,
    SEC_BASELINE,
    SEC_METADATA,
    SEC_BLOBS,
    SEC_BLOB_DATA,
    SEC_FIXUPS,
    SEC_SITES,
    SEC_UNWIND,
    SEC_STRINGS
};

static const char *const SECTION_NAMES[HPK_SECTION_COUNT] = {
    "TARGET", "BASELINE", "METADATA", "BLOBS", "BLOB_DATA", "FIXUPS", "SITES", "UNWIND", "STRINGS"};

#define SECTIONS_START (HPK_HEADER_SIZE + HPK_SECTION_COUNT * HPK_SECTION_ENTRY_SIZE)
#define TARGET_SIZE 48u
#define BASELINE_SIZE 8u
#define METADATA_HEAD 16u
#define BLOB_RECORD 16u
#define FIXUP_RECORD 32u
#define SITE_RECORD 96u
#define UNWIND_RECORD 24u
#define METADATA_CREATED 1u
#define SITE_HAS_PADDING 1u
#define PADDING_JMP_SIZE 5u

static const uint8_t MAGIC[8] = {0x89, 'H', 'P', 'K', '\r', '\n', 0x1a, '\n'};

/* ================================================================ helpers */

static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

static uint32_t rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static uint64_t rd64(const uint8_t *p) { return (uint64_t)rd32(p) | ((uint64_t)rd32(p + 4) << 32); }

static uint64_t align8(uint64_t value) { return (value + 7u) & ~(uint64_t)7u; }

typedef struct span {
    const uint8_t *p;
    uint64_t size;
} span;

typedef struct ctx {
    const uint8_t *d;
    uint64_t size;
    char *err;
    size_t errlen;
    span sec[HPK_SECTION_COUNT];
    uint32_t string_count;
    uint64_t string_data; /* offset of the string data inside the STRINGS section */
    hpk_package *out;
} ctx;

#if defined(__GNUC__) && !defined(__MINGW32__)
__attribute__((format(printf, 3, 4)))
#endif
static int fail(ctx *c, int code, const char *fmt, ...)
{
    if (c->err != NULL && c->errlen > 0) {
        va_list args;
        va_start(args, fmt);
        vsnprintf(c->err, c->errlen, fmt, args);
        va_end(args);
    }
    return code;
}

static int all_zero(const uint8_t *p, uint64_t n)
{
    uint64_t i;
    for (i = 0; i < n; i++)
        if (p[i] != 0)
            return 0;
    return 1;
}

/* Strict UTF-8 as Python decodes it: no overlongs, no surrogates, nothing above U+10FFFF. */
static int utf8_valid(const uint8_t *s, uint64_t n)
{
    uint64_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        uint8_t lo = 0x80, hi = 0xBF;
        uint64_t more, k;
        if (c < 0x80) {
            i++;
            continue;
        }
        if (c < 0xC2)
            return 0;
        if (c < 0xE0) {
            more = 1;
        } else if (c < 0xF0) {
            more = 2;
            if (c == 0xE0)
                lo = 0xA0;
            if (c == 0xED)
                hi = 0x9F;
        } else if (c < 0xF5) {
            more = 3;
            if (c == 0xF0)
                lo = 0x90;
            if (c == 0xF4)
                hi = 0x8F;
        } else {
            return 0;
        }
        if (n - i - 1 < more)
            return 0;
        if (s[i + 1] < lo || s[i + 1] > hi)
            return 0;
        for (k = 2; k <= more; k++)
            if (s[i + k] < 0x80 || s[i + k] > 0xBF)
                return 0;
        i += more + 1;
    }
    return 1;
}

/* The bytes of a string already bounded by the caller: UTF-8 and NUL rules. */
static int check_text(ctx *c, const uint8_t *s, uint64_t n, const char *what, uint32_t index)
{
    if (!utf8_valid(s, n))
        return fail(c, HPK_E_ENCODING, "%s %u: invalid UTF-8", what, (unsigned)index);
    if (memchr(s, 0, (size_t)n) != NULL)
        return fail(c, HPK_E_ENCODING, "%s %u: contains a NUL byte", what, (unsigned)index);
    return HPK_OK;
}

/* ================================================================ SHA-256 */

/* A plain FIPS 180-4 SHA-256, written for this reader (tested against hashlib). */

static const uint32_t K256[64] = {
    0x428a2f98u, 0x71374491u, 0xb5c0fbcfu, 0xe9b5dba5u, 0x3956c25bu, 0x59f111f1u, 0x923f82a4u, 0xab1c5ed5u,
    0xd807aa98u, 0x12835b01u, 0x243185beu, 0x550c7dc3u, 0x72be5d74u, 0x80deb1feu, 0x9bdc06a7u, 0xc19bf174u,
    0xe49b69c1u, 0xefbe4786u, 0x0fc19dc6u, 0x240ca1ccu, 0x2de92c6fu, 0x4a7484aau, 0x5cb0a9dcu, 0x76f988dau,
    0x983e5152u, 0xa831c66du, 0xb00327c8u, 0xbf597fc7u, 0xc6e00bf3u, 0xd5a79147u, 0x06ca6351u, 0x14292967u,
    0x27b70a85u, 0x2e1b2138u, 0x4d2c6dfcu, 0x53380d13u, 0x650a7354u, 0x766a0abbu, 0x81c2c92eu, 0x92722c85u,
    0xa2bfe8a1u, 0xa81a664bu, 0xc24b8b70u, 0xc76c51a3u, 0xd192e819u, 0xd6990624u, 0xf40e3585u, 0x106aa070u,
    0x19a4c116u, 0x1e376c08u, 0x2748774cu, 0x34b0bcb5u, 0x391c0cb3u, 0x4ed8aa4au, 0x5b9cca4fu, 0x682e6ff3u,
    0x748f82eeu, 0x78a5636fu, 0x84c87814u, 0x8cc70208u, 0x90befffau, 0xa4506cebu, 0xbef9a3f7u, 0xc67178f2u};

static uint32_t ror32(uint32_t x, unsigned n) { return (x >> n) | (x << (32u - n)); }

static void sha256_block(uint32_t h[8], const uint8_t *block)
{
    uint32_t w[64], a, b, cc, d, e, f, g, hh, t1, t2;
    unsigned i;
    for (i = 0; i < 16; i++)
        w[i] = ((uint32_t)block[4 * i] << 24) | ((uint32_t)block[4 * i + 1] << 16) |
               ((uint32_t)block[4 * i + 2] << 8) | (uint32_t)block[4 * i + 3];
    for (i = 16; i < 64; i++) {
        uint32_t s0 = ror32(w[i - 15], 7) ^ ror32(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ror32(w[i - 2], 17) ^ ror32(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = h[0], b = h[1], cc = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
    for (i = 0; i < 64; i++) {
        t1 = hh + (ror32(e, 6) ^ ror32(e, 11) ^ ror32(e, 25)) + ((e & f) ^ (~e & g)) + K256[i] + w[i];
        t2 = (ror32(a, 2) ^ ror32(a, 13) ^ ror32(a, 22)) + ((a & b) ^ (a & cc) ^ (b & cc));
        hh = g, g = f, f = e, e = d + t1, d = cc, cc = b, b = a, a = t1 + t2;
    }
    h[0] += a, h[1] += b, h[2] += cc, h[3] += d, h[4] += e, h[5] += f, h[6] += g, h[7] += hh;
}

void hpk_sha256(const uint8_t *data, size_t size, uint8_t out[32])
{
    uint32_t h[8] = {0x6a09e667u, 0xbb67ae85u, 0x3c6ef372u, 0xa54ff53au,
                     0x510e527fu, 0x9b05688cu, 0x1f83d9abu, 0x5be0cd19u};
    uint8_t tail[128];
    size_t full = size - size % 64, rest = size % 64, tail_len, i;
    uint64_t bits = (uint64_t)size * 8u;
    for (i = 0; i < full; i += 64)
        sha256_block(h, data + i);
    memset(tail, 0, sizeof tail);
    if (rest > 0)
        memcpy(tail, data + full, rest);
    tail[rest] = 0x80;
    tail_len = rest + 1 + 8 <= 64 ? 64 : 128;
    for (i = 0; i < 8; i++)
        tail[tail_len - 1 - i] = (uint8_t)(bits >> (8 * i));
    sha256_block(h, tail);
    if (tail_len == 128)
        sha256_block(h, tail + 64);
    for (i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t)(h[i] >> 24);
        out[4 * i + 1] = (uint8_t)(h[i] >> 16);
        out[4 * i + 2] = (uint8_t)(h[i] >> 8);
        out[4 * i + 3] = (uint8_t)h[i];
    }
}

/* ================================================================ header, hash, section table */

static int parse_header(ctx *c)
{
    const uint8_t *d = c->d;
    uint64_t content_size, trailer;
    size_t magic_len = c->size < 8 ? (size_t)c->size : 8;
    if (magic_len > 0 && memcmp(d, MAGIC, magic_len) != 0)
        return fail(c, HPK_E_MAGIC, "not a hotpatch package (bad magic)");
    if (c->size < HPK_HEADER_SIZE)
        return fail(c, HPK_E_TRUNCATED, "%u bytes: shorter than the %u-byte header", (unsigned)c->size,
                    HPK_HEADER_SIZE);
    if (rd16(d + 8) != HPK_FORMAT_VERSION)
        return fail(c, HPK_E_VERSION, "format version %u is not supported (only %u)", (unsigned)rd16(d + 8),
                    HPK_FORMAT_VERSION);
    if (c->size > HPK_MAX_FILE_SIZE)
        return fail(c, HPK_E_LIMIT, "larger than the %u-byte limit", HPK_MAX_FILE_SIZE);
    if (rd16(d + 10) != HPK_HEADER_SIZE)
        return fail(c, HPK_E_LAYOUT, "header size %u, expected %u", (unsigned)rd16(d + 10), HPK_HEADER_SIZE);
    if (rd32(d + 12) != 0)
        return fail(c, HPK_E_FIELD, "header flags 0x%x: no flag is defined", (unsigned)rd32(d + 12));
    if (rd32(d + 16) != HPK_SECTION_COUNT)
        return fail(c, HPK_E_LAYOUT, "%u sections, expected %u", (unsigned)rd32(d + 16), HPK_SECTION_COUNT);
    if (rd32(d + 20) != 0)
        return fail(c, HPK_E_FIELD, "header: reserved field is not 0");
    content_size = rd64(d + 24);
    if (content_size < SECTIONS_START || content_size % 8 != 0)
        return fail(c, HPK_E_LAYOUT, "content size is not a valid content size");
    if (content_size > c->size - HPK_HASH_SIZE)
        return fail(c, HPK_E_TRUNCATED, "%u bytes: content and hash need more", (unsigned)c->size);
    trailer = c->size - content_size - HPK_HASH_SIZE;
    if (trailer > 0 && trailer < HPK_SIGNATURE_BLOCK_SIZE)
        return fail(c, HPK_E_TRUNCATED, "signature block of %u bytes, expected %u", (unsigned)trailer,
                    HPK_SIGNATURE_BLOCK_SIZE);
    if (trailer > HPK_SIGNATURE_BLOCK_SIZE)
        return fail(c, HPK_E_LAYOUT, "%u bytes after the signature block",
                    (unsigned)(trailer - HPK_SIGNATURE_BLOCK_SIZE));
    c->out->format_version = HPK_FORMAT_VERSION;
    c->out->content_size = (size_t)content_size;
    c->out->content_sha256 = d + content_size;
    if (trailer == HPK_SIGNATURE_BLOCK_SIZE) {
        c->out->has_signature = 1;
        c->out->public_key = d + content_size + HPK_HASH_SIZE;
        c->out->signature = d + content_size + HPK_HASH_SIZE + HPK_PUBLIC_KEY_SIZE;
    }
    return HPK_OK;
}

static int check_hash(ctx *c)
{
    uint8_t digest[32];
    hpk_sha256(c->d, c->out->content_size, digest);
    if (memcmp(digest, c->out->content_sha256, 32) != 0)
        return fail(c, HPK_E_HASH, "content SHA-256 mismatch: the package is corrupt or was altered");
    return HPK_OK;
}

static int parse_section_table(ctx *c)
{
    uint64_t content_size = c->out->content_size, expected = SECTIONS_START, previous_end = SECTIONS_START;
    unsigned i;
    for (i = 0; i < HPK_SECTION_COUNT; i++) {
        const uint8_t *e = c->d + HPK_HEADER_SIZE + HPK_SECTION_ENTRY_SIZE * i;
        uint32_t kind = rd32(e), reserved = rd32(e + 4), offset = rd32(e + 8), size = rd32(e + 12);
        if (kind != i + 1)
            return fail(c, HPK_E_LAYOUT, "section %u has kind %u, expected %s", i, (unsigned)kind,
                        SECTION_NAMES[i]);
        if (reserved != 0)
            return fail(c, HPK_E_FIELD, "section %s: reserved field is not 0", SECTION_NAMES[i]);
        if (offset != expected)
            return fail(c, HPK_E_LAYOUT, "section %s at 0x%x, expected 0x%x", SECTION_NAMES[i],
                        (unsigned)offset, (unsigned)expected);
        if (size > content_size - offset)
            return fail(c, HPK_E_LAYOUT, "section %s is past the content", SECTION_NAMES[i]);
        if (!all_zero(c->d + previous_end, offset - previous_end))
            return fail(c, HPK_E_LAYOUT, "before section %s: padding is not zero", SECTION_NAMES[i]);
        c->sec[i].p = c->d + offset;
        c->sec[i].size = size;
        previous_end = (uint64_t)offset + size;
        expected = align8(previous_end);
    }
    if (expected != content_size)
        return fail(c, HPK_E_LAYOUT, "the sections end at %u, not at the content size", (unsigned)expected);
    if (!all_zero(c->d + previous_end, content_size - previous_end))
        return fail(c, HPK_E_LAYOUT, "after the last section: padding is not zero");
    return HPK_OK;
}

/* ================================================================ strings */

static int parse_strings(ctx *c)
{
    span t = c->sec[SEC_STRINGS];
    uint64_t data_start, expected = 0;
    uint32_t count, i;
    int rc;
    if (t.size < 8)
        return fail(c, HPK_E_LAYOUT, "string table: shorter than its header");
    count = rd32(t.p);
    if (rd32(t.p + 4) != 0)
        return fail(c, HPK_E_FIELD, "string table: reserved field is not 0");
    if (count > HPK_MAX_STRINGS)
        return fail(c, HPK_E_LIMIT, "%u strings, the limit is %u", (unsigned)count, HPK_MAX_STRINGS);
    data_start = 8 + 8 * (uint64_t)count;
    if (data_start > t.size)
        return fail(c, HPK_E_LAYOUT, "string table: %u entries do not fit", (unsigned)count);
    for (i = 0; i < count; i++) {
        uint32_t offset = rd32(t.p + 8 + 8 * (uint64_t)i), length = rd32(t.p + 12 + 8 * (uint64_t)i);
        uint64_t begin;
        if (offset != expected)
            return fail(c, HPK_E_LAYOUT, "string %u at %u, expected %u", (unsigned)i, (unsigned)offset,
                        (unsigned)expected);
        if (length > HPK_MAX_STRING_BYTES)
            return fail(c, HPK_E_LIMIT, "string %u: %u bytes, the limit is %u", (unsigned)i, (unsigned)length,
                        HPK_MAX_STRING_BYTES);
        begin = data_start + offset;
        if (begin + length + 1 > t.size)
            return fail(c, HPK_E_LAYOUT, "string %u runs past the string table", (unsigned)i);
        if (t.p[begin + length] != 0)
            return fail(c, HPK_E_ENCODING, "string %u: no NUL terminator", (unsigned)i);
        if ((rc = check_text(c, t.p + begin, length, "string", i)) != HPK_OK)
            return rc;
        expected = (uint64_t)offset + length + 1;
    }
    if (data_start + expected != t.size)
        return fail(c, HPK_E_LAYOUT, "string table: bytes after the last string");
    c->string_count = count;
    c->string_data = data_start;
    c->out->strings_ = t.p;
    c->out->string_count = count;
    return HPK_OK;
}

/* A string by index, from the validated table: O(1). */
static int string_ref(ctx *c, uint32_t index, hpk_str *out, const char *what, uint32_t record)
{
    const uint8_t *t = c->sec[SEC_STRINGS].p;
    if (index >= c->string_count)
        return fail(c, HPK_E_LAYOUT, "%s %u: string %u does not exist (%u strings)", what, (unsigned)record,
                    (unsigned)index, (unsigned)c->string_count);
    out->ptr = (const char *)(t + c->string_data + rd32(t + 8 + 8 * (uint64_t)index));
    out->len = rd32(t + 12 + 8 * (uint64_t)index);
    return HPK_OK;
}

static int nonempty(ctx *c, const hpk_str *s, const char *what, uint32_t record)
{
    if (s->len == 0)
        return fail(c, HPK_E_FIELD, "%s %u: must not be empty", what, (unsigned)record);
    return HPK_OK;
}

/* ================================================================ singleton sections */

static int parse_target(ctx *c)
{
    span s = c->sec[SEC_TARGET];
    hpk_package *o = c->out;
    int rc;
    if (s.size != TARGET_SIZE)
        return fail(c, HPK_E_LAYOUT, "target section: %u bytes, expected %u", (unsigned)s.size, TARGET_SIZE);
    if ((rc = string_ref(c, rd32(s.p), &o->module_name, "module name", 0)) != HPK_OK)
        return rc;
    o->timedatestamp = rd32(s.p + 4);
    o->size_of_image = rd32(s.p + 8);
    o->checksum = rd32(s.p + 12);
    o->code_sha256 = s.p + 16;
    if ((rc = nonempty(c, &o->module_name, "module name", 0)) != HPK_OK)
        return rc;
    if (o->size_of_image == 0)
        return fail(c, HPK_E_FIELD, "SizeOfImage: must not be 0");
    return HPK_OK;
}

static int parse_baseline(ctx *c)
{
    span s = c->sec[SEC_BASELINE];
    int rc;
    if (s.size != BASELINE_SIZE)
        return fail(c, HPK_E_LAYOUT, "baseline section: %u bytes, expected %u", (unsigned)s.size, BASELINE_SIZE);
    if ((rc = string_ref(c, rd32(s.p), &c->out->baseline_id, "baseline id", 0)) != HPK_OK)
        return rc;
    c->out->sequence = rd32(s.p + 4);
    return nonempty(c, &c->out->baseline_id, "baseline id", 0);
}

/* An inline metadata string: u16 length, bytes, NUL. */
static int metadata_text(ctx *c, span s, uint64_t *position, hpk_str *out, const char *what, uint32_t index)
{
    uint64_t begin;
    uint16_t length;
    int rc;
    if (*position + 2 > s.size)
        return fail(c, HPK_E_LAYOUT, "metadata: %s %u runs past the section", what, (unsigned)index);
    length = rd16(s.p + *position);
    if (length > HPK_MAX_STRING_BYTES)
        return fail(c, HPK_E_LIMIT, "metadata: %s %u of %u bytes, the limit is %u", what, (unsigned)index,
                    (unsigned)length, HPK_MAX_STRING_BYTES);
    begin = *position + 2;
    if (begin + length + 1 > s.size)
        return fail(c, HPK_E_LAYOUT, "metadata: %s %u runs past the section", what, (unsigned)index);
    if (s.p[begin + length] != 0)
        return fail(c, HPK_E_ENCODING, "metadata: %s %u has no NUL terminator", what, (unsigned)index);
    if ((rc = check_text(c, s.p + begin, length, what, index)) != HPK_OK)
        return rc;
    if (out != NULL) {
        out->ptr = (const char *)(s.p + begin);
        out->len = length;
    }
    *position = begin + length + 1;
    return HPK_OK;
}

static int parse_metadata(ctx *c)
{
    span s = c->sec[SEC_METADATA];
    hpk_package *o = c->out;
    uint64_t created, position = METADATA_HEAD, list_start;
    uint32_t flags, count, i;
    int rc;
    if (s.size < METADATA_HEAD)
        return fail(c, HPK_E_LAYOUT, "metadata section: shorter than its header");
    created = rd64(s.p);
    flags = rd32(s.p + 8);
    count = rd32(s.p + 12);
    if (flags & ~METADATA_CREATED)
        return fail(c, HPK_E_FIELD, "metadata flags 0x%x", (unsigned)flags);
    if (!(flags & METADATA_CREATED) && created != 0)
        return fail(c, HPK_E_FIELD, "metadata: a creation time without its flag");
    if (count > HPK_MAX_CVE_IDS)
        return fail(c, HPK_E_LIMIT, "%u CVE ids, the limit is %u", (unsigned)count, HPK_MAX_CVE_IDS);
    if ((rc = metadata_text(c, s, &position, &o->description, "description", 0)) != HPK_OK)
        return rc;
    if ((rc = metadata_text(c, s, &position, &o->creator, "creator", 0)) != HPK_OK)
        return rc;
    list_start = position;
    for (i = 0; i < count; i++) {
        hpk_str cve;
        if ((rc = metadata_text(c, s, &position, &cve, "CVE id", i)) != HPK_OK)
            return rc;
        if ((rc = nonempty(c, &cve, "CVE id", i)) != HPK_OK)
            return rc;
    }
    if (position != s.size)
        return fail(c, HPK_E_LAYOUT, "metadata: bytes after the last CVE id");
    o->has_created = (flags & METADATA_CREATED) != 0;
    o->created = created;
    o->cve_count = count;
    o->cve_list_ = s.p + list_start;
    o->cve_list_size_ = (size_t)(s.size - list_start);
    return HPK_OK;
}

/* ================================================================ record sections */

static int record_count(ctx *c, int section, uint64_t record, uint32_t limit, uint32_t *count)
{
    uint64_t size = c->sec[section].size;
    if (size % record != 0)
        return fail(c, HPK_E_LAYOUT, "%s section: %u bytes is not a whole number of records",
                    SECTION_NAMES[section], (unsigned)size);
    if (size / record > limit)
        return fail(c, HPK_E_LIMIT, "%u %s records, the limit is %u", (unsigned)(size / record),
                    SECTION_NAMES[section], (unsigned)limit);
    *count = (uint32_t)(size / record);
    return HPK_OK;
}

static int parse_blobs(ctx *c)
{
    span data = c->sec[SEC_BLOB_DATA];
    uint64_t data_end = 0, total = 0;
    uint32_t count, i;
    int rc;
    if ((rc = record_count(c, SEC_BLOBS, BLOB_RECORD, HPK_MAX_BLOBS, &count)) != HPK_OK)
        return rc;
    for (i = 0; i < count; i++) {
        const uint8_t *r = c->sec[SEC_BLOBS].p + BLOB_RECORD * (uint64_t)i;
        uint8_t kind = r[0], log2 = r[1];
        uint32_t size = rd32(r + 4), data_offset = rd32(r + 8), data_size = rd32(r + 12);
        if (kind < HPK_BLOB_CODE || kind > HPK_BLOB_BSS)
            return fail(c, HPK_E_FIELD, "blob %u: unknown kind %u", (unsigned)i, (unsigned)kind);
        if (log2 > HPK_MAX_ALIGN_LOG2)
            return fail(c, HPK_E_FIELD, "blob %u: alignment 2**%u is above 4096", (unsigned)i, (unsigned)log2);
        if (rd16(r + 2) != 0)
            return fail(c, HPK_E_FIELD, "blob %u: reserved field is not 0", (unsigned)i);
        if (size == 0)
            return fail(c, HPK_E_FIELD, "blob %u: size must not be 0", (unsigned)i);
        if (size > HPK_MAX_BLOB_SIZE)
            return fail(c, HPK_E_LIMIT, "blob %u: size %u exceeds the limit %u", (unsigned)i, (unsigned)size,
                        HPK_MAX_BLOB_SIZE);
        if (kind == HPK_BLOB_BSS) {
            if (data_offset != 0 || data_size != 0)
                return fail(c, HPK_E_LAYOUT, "blob %u: a BSS blob carries no bytes", (unsigned)i);
        } else {
            if (data_size != size)
                return fail(c, HPK_E_LAYOUT, "blob %u: %u bytes of data for size %u", (unsigned)i,
                            (unsigned)data_size, (unsigned)size);
            if (data_offset != align8(data_end))
                return fail(c, HPK_E_LAYOUT, "blob %u: data at 0x%x, expected 0x%x", (unsigned)i,
                            (unsigned)data_offset, (unsigned)align8(data_end));
            if ((uint64_t)data_offset + data_size > data.size)
                return fail(c, HPK_E_LAYOUT, "blob %u: data runs past the blob data section", (unsigned)i);
            if (!all_zero(data.p + data_end, data_offset - data_end))
                return fail(c, HPK_E_LAYOUT, "blob %u: padding before its data is not zero", (unsigned)i);
            data_end = (uint64_t)data_offset + data_size;
        }
        total += size;
        if (total > HPK_MAX_TOTAL_BLOB_SIZE)
            return fail(c, HPK_E_LIMIT, "blobs take more than %u bytes in memory", HPK_MAX_TOTAL_BLOB_SIZE);
    }
    if (data_end != data.size)
        return fail(c, HPK_E_LAYOUT, "blob data section: bytes after the last blob's data");
    c->out->blob_count = count;
    c->out->blob_table_ = c->sec[SEC_BLOBS].p;
    c->out->blob_data_ = data.p;
    return HPK_OK;
}

static int parse_fixups(ctx *c)
{
    uint32_t count, i;
    uint64_t previous = 0;
    int rc;
    if ((rc = record_count(c, SEC_FIXUPS, FIXUP_RECORD, HPK_MAX_FIXUPS, &count)) != HPK_OK)
        return rc;
    for (i = 0; i < count; i++) {
        const uint8_t *r = c->sec[SEC_FIXUPS].p + FIXUP_RECORD * (uint64_t)i;
        uint32_t blob = rd32(r), offset = rd32(r + 4), a = rd32(r + 12), b = rd32(r + 16);
        uint8_t kind = r[8], target_kind = r[9];
        uint64_t key = ((uint64_t)blob << 32) | offset;
        if (kind < HPK_FIXUP_REL32 || kind > HPK_FIXUP_ALLOC_REL32)
            return fail(c, HPK_E_FIELD, "fixup %u: unknown kind %u", (unsigned)i, (unsigned)kind);
        if (target_kind < HPK_TARGET_BASELINE_RVA || target_kind > HPK_TARGET_IMPORT)
            return fail(c, HPK_E_FIELD, "fixup %u: unknown target kind %u", (unsigned)i, (unsigned)target_kind);
        if (rd16(r + 10) != 0 || rd32(r + 20) != 0)
            return fail(c, HPK_E_FIELD, "fixup %u: reserved field is not 0", (unsigned)i);
        if (target_kind == HPK_TARGET_BASELINE_RVA && b != 0)
            return fail(c, HPK_E_FIELD, "fixup %u: second target field of an RVA target is not 0", (unsigned)i);
        if (target_kind == HPK_TARGET_IMPORT) {
            hpk_str dll, name;
            if ((rc = string_ref(c, a, &dll, "fixup DLL", i)) != HPK_OK)
                return rc;
            if ((rc = string_ref(c, b, &name, "fixup symbol", i)) != HPK_OK)
                return rc;
            if ((rc = nonempty(c, &dll, "fixup DLL", i)) != HPK_OK)
                return rc;
            if ((rc = nonempty(c, &name, "fixup symbol", i)) != HPK_OK)
                return rc;
        }
        if (i > 0 && key <= previous)
            return fail(c, HPK_E_LAYOUT, "fixup %u: not in (blob, offset) order", (unsigned)i);
        previous = key;
    }
    c->out->fixup_count = count;
    c->out->fixup_table_ = c->sec[SEC_FIXUPS].p;
    return HPK_OK;
}

static unsigned strategy_width(uint8_t strategy)
{
    return strategy == HPK_SHORT_JMP_PADDING ? 2u : strategy == HPK_REL32_JMP ? 5u : 14u;
}

/* The checks of PatchSite.__post_init__ and of the site record: all of the FIELD family. */
static int check_site_fields(ctx *c, const uint8_t *r, uint32_t i, const hpk_str *function)
{
    uint32_t rva = rd32(r), padding_rva = rd32(r + 24);
    uint8_t strategy = r[16], fallback_count = r[17], expected_size = r[20], padding_size = r[21];
    uint16_t flags = rd16(r + 22);
    uint8_t strategies[3];
    unsigned n = 0, k, j, widest = 0, has_short = 0;
    int64_t displacement, lo, hi, x;
    if (strategy < HPK_SHORT_JMP_PADDING || strategy > HPK_ABS_JMP)
        return fail(c, HPK_E_FIELD, "site %u: unknown strategy %u", (unsigned)i, (unsigned)strategy);
    if (fallback_count > 2)
        return fail(c, HPK_E_FIELD, "site %u: %u fallbacks, at most 2", (unsigned)i, (unsigned)fallback_count);
    for (k = 0; k < 2; k++) {
        uint8_t f = r[18 + k];
        if (k < fallback_count ? (f < HPK_SHORT_JMP_PADDING || f > HPK_ABS_JMP) : f != 0)
            return fail(c, HPK_E_FIELD, "site %u: bad fallback strategies", (unsigned)i);
    }
    if (expected_size < 1 || expected_size > HPK_MAX_EXPECTED || padding_size > HPK_MAX_EXPECTED)
        return fail(c, HPK_E_FIELD, "site %u: expected/padding sizes %u/%u", (unsigned)i, (unsigned)expected_size,
                    (unsigned)padding_size);
    if ((flags & ~SITE_HAS_PADDING) != 0 || rd32(r + 28) != 0)
        return fail(c, HPK_E_FIELD, "site %u: unknown flags or reserved field set", (unsigned)i);
    if (!(flags & SITE_HAS_PADDING) && (padding_rva != 0 || padding_size != 0))
        return fail(c, HPK_E_FIELD, "site %u: padding fields without the padding flag", (unsigned)i);
    if (!all_zero(r + 32 + expected_size, HPK_MAX_EXPECTED - expected_size) ||
        !all_zero(r + 64 + padding_size, HPK_MAX_EXPECTED - padding_size))
        return fail(c, HPK_E_FIELD, "site %u: bytes after the expected or padding bytes are not 0", (unsigned)i);
    if (function->len == 0)
        return fail(c, HPK_E_FIELD, "site %u: function must not be empty", (unsigned)i);
    strategies[n++] = strategy;
    for (k = 0; k < fallback_count; k++)
        strategies[n++] = r[18 + k];
    for (k = 0; k < n; k++) {
        for (j = k + 1; j < n; j++)
            if (strategies[k] == strategies[j])
                return fail(c, HPK_E_FIELD, "site %u: a strategy appears twice", (unsigned)i);
        if (strategy_width(strategies[k]) > widest)
            widest = strategy_width(strategies[k]);
        if (strategies[k] == HPK_SHORT_JMP_PADDING)
            has_short = 1;
    }
    if (expected_size < widest)
        return fail(c, HPK_E_FIELD, "site %u: %u expected bytes, its strategies overwrite %u", (unsigned)i,
                    (unsigned)expected_size, widest);
    if (!has_short) {
        if ((flags & SITE_HAS_PADDING) || padding_size != 0)
            return fail(c, HPK_E_FIELD, "site %u: padding given but no strategy uses it", (unsigned)i);
        return HPK_OK;
    }
    if (!(flags & SITE_HAS_PADDING))
        return fail(c, HPK_E_FIELD, "site %u: SHORT_JMP_PADDING needs a padding RVA", (unsigned)i);
    if (padding_size < PADDING_JMP_SIZE)
        return fail(c, HPK_E_FIELD, "site %u: %u padding bytes, the jump needs 5", (unsigned)i,
                    (unsigned)padding_size);
    displacement = (int64_t)padding_rva - ((int64_t)rva + 2);
    if (displacement < -128 || displacement > 127)
        return fail(c, HPK_E_FIELD, "site %u: padding is out of reach of a short jump", (unsigned)i);
    if ((int64_t)padding_rva < (int64_t)rva + 2 && (int64_t)rva < (int64_t)padding_rva + padding_size)
        return fail(c, HPK_E_FIELD, "site %u: padding overlaps the short jump", (unsigned)i);
    lo = rva > padding_rva ? (int64_t)rva : (int64_t)padding_rva;
    hi = (int64_t)rva + expected_size;
    if ((int64_t)padding_rva + padding_size < hi)
        hi = (int64_t)padding_rva + padding_size;
    for (x = lo; x < hi; x++)
        if (r[32 + (x - (int64_t)rva)] != r[64 + (x - (int64_t)padding_rva)])
            return fail(c, HPK_E_FIELD, "site %u: expected and padding bytes disagree", (unsigned)i);
    return HPK_OK;
}

static int parse_sites(ctx *c)
{
    uint32_t count, i;
    uint32_t previous = 0;
    int rc;
    if ((rc = record_count(c, SEC_SITES, SITE_RECORD, HPK_MAX_SITES, &count)) != HPK_OK)
        return rc;
    for (i = 0; i < count; i++) {
        const uint8_t *r = c->sec[SEC_SITES].p + SITE_RECORD * (uint64_t)i;
        hpk_str function;
        if ((rc = string_ref(c, rd32(r + 4), &function, "site function", i)) != HPK_OK)
            return rc;
        if ((rc = check_site_fields(c, r, i, &function)) != HPK_OK)
            return rc;
        if (i > 0 && rd32(r) <= previous)
            return fail(c, HPK_E_LAYOUT, "site %u: not in RVA order", (unsigned)i);
        previous = rd32(r);
    }
    c->out->site_count = count;
    c->out->site_table_ = c->sec[SEC_SITES].p;
    return HPK_OK;
}

static int parse_unwind(ctx *c)
{
    uint32_t count, i;
    uint64_t previous = 0;
    int rc;
    if ((rc = record_count(c, SEC_UNWIND, UNWIND_RECORD, HPK_MAX_UNWIND, &count)) != HPK_OK)
        return rc;
    for (i = 0; i < count; i++) {
        const uint8_t *r = c->sec[SEC_UNWIND].p + UNWIND_RECORD * (uint64_t)i;
        uint64_t key = ((uint64_t)rd32(r) << 32) | rd32(r + 4);
        if (rd32(r + 20) != 0)
            return fail(c, HPK_E_FIELD, "unwind entry %u: reserved field is not 0", (unsigned)i);
        if (rd32(r + 4) >= rd32(r + 8))
            return fail(c, HPK_E_FIELD, "unwind entry %u: begin must be below end", (unsigned)i);
        if (i > 0 && key <= previous)
            return fail(c, HPK_E_LAYOUT, "unwind entry %u: not in (blob, begin) order", (unsigned)i);
        previous = key;
    }
    c->out->unwind_count = count;
    c->out->unwind_table_ = c->sec[SEC_UNWIND].p;
    return HPK_OK;
}

/* ================================================================ references between records */

/* The checks of Package.__post_init__, in its order. */

static int blob_ref(ctx *c, uint32_t index, hpk_blob *out, const char *what, uint32_t record)
{
    if (index >= c->out->blob_count)
        return fail(c, HPK_E_LAYOUT, "%s %u: blob %u does not exist (%u blobs)", what, (unsigned)record,
                    (unsigned)index, (unsigned)c->out->blob_count);
    return hpk_blob_at(c->out, index, out);
}

static int check_fixup_refs(ctx *c)
{
    uint32_t i, previous_blob = 0;
    uint64_t previous_end = 0;
    int rc;
    for (i = 0; i < c->out->fixup_count; i++) {
        hpk_fixup f;
        hpk_blob blob, aimed;
        uint64_t end;
        hpk_fixup_at(c->out, i, &f);
        if ((rc = blob_ref(c, f.blob, &blob, "fixup", i)) != HPK_OK)
            return rc;
        if (blob.kind == HPK_BLOB_BSS)
            return fail(c, HPK_E_LAYOUT, "fixup %u: a BSS blob has no bytes to fix up", (unsigned)i);
        end = (uint64_t)f.offset + (f.kind == HPK_FIXUP_ABS64 ? 8u : 4u);
        if (end > blob.size)
            return fail(c, HPK_E_LAYOUT, "fixup %u: does not fit in blob %u", (unsigned)i, (unsigned)f.blob);
        if (i > 0 && previous_blob == f.blob && f.offset < previous_end)
            return fail(c, HPK_E_LAYOUT, "fixup %u: overlaps the previous fixup", (unsigned)i);
        if (f.target_kind == HPK_TARGET_BASELINE_RVA && f.target_rva >= c->out->size_of_image)
            return fail(c, HPK_E_LAYOUT, "fixup %u: target RVA 0x%x is outside the image", (unsigned)i,
                        (unsigned)f.target_rva);
        if (f.target_kind == HPK_TARGET_BLOB) {
            if ((rc = blob_ref(c, f.target_blob, &aimed, "fixup target", i)) != HPK_OK)
                return rc;
            if (f.target_offset > aimed.size)
                return fail(c, HPK_E_LAYOUT, "fixup %u: target offset is past blob %u", (unsigned)i,
                            (unsigned)f.target_blob);
        }
        previous_blob = f.blob;
        previous_end = end;
    }
    return HPK_OK;
}

static void site_footprint(const hpk_site *s, uint64_t *begin, uint64_t *end)
{
    *begin = s->rva;
    *end = (uint64_t)s->rva + s->expected_size;
    if (s->has_padding) {
        if (s->padding_rva < *begin)
            *begin = s->padding_rva;
        if ((uint64_t)s->padding_rva + s->padding_size > *end)
            *end = (uint64_t)s->padding_rva + s->padding_size;
    }
}

static int check_site_refs(ctx *c)
{
    uint32_t i;
    uint64_t previous_end = 0;
    int rc;
    for (i = 0; i < c->out->site_count; i++) {
        hpk_site s;
        hpk_blob blob;
        uint64_t begin, end;
        hpk_site_at(c->out, i, &s);
        if ((rc = blob_ref(c, s.target_blob, &blob, "site", i)) != HPK_OK)
            return rc;
        if (blob.kind != HPK_BLOB_CODE)
            return fail(c, HPK_E_LAYOUT, "site %u: target blob %u is not code", (unsigned)i, (unsigned)s.target_blob);
        if (s.target_offset >= blob.size)
            return fail(c, HPK_E_LAYOUT, "site %u: target offset is past its blob", (unsigned)i);
        if ((uint64_t)s.rva + s.expected_size > c->out->size_of_image)
            return fail(c, HPK_E_LAYOUT, "site %u: expected bytes run past the image", (unsigned)i);
        if (s.has_padding && (uint64_t)s.padding_rva + s.padding_size > c->out->size_of_image)
            return fail(c, HPK_E_LAYOUT, "site %u: padding runs past the image", (unsigned)i);
        site_footprint(&s, &begin, &end);
        if (i > 0 && begin < previous_end)
            return fail(c, HPK_E_LAYOUT, "site %u: overlaps the previous site", (unsigned)i);
        previous_end = end;
    }
    return HPK_OK;
}

static int check_unwind_refs(ctx *c)
{
    uint32_t i, previous_blob = 0, previous_end = 0;
    int rc;
    for (i = 0; i < c->out->unwind_count; i++) {
        hpk_unwind u;
        hpk_blob code, info;
        const uint8_t *p;
        unsigned version, flags, count;
        uint64_t size;
        hpk_unwind_at(c->out, i, &u);
        if ((rc = blob_ref(c, u.code_blob, &code, "unwind entry", i)) != HPK_OK)
            return rc;
        if (code.kind != HPK_BLOB_CODE)
            return fail(c, HPK_E_LAYOUT, "unwind entry %u: blob %u is not code", (unsigned)i, (unsigned)u.code_blob);
        if (u.end > code.size)
            return fail(c, HPK_E_LAYOUT, "unwind entry %u: end is past its blob", (unsigned)i);
        if (i > 0 && previous_blob == u.code_blob && u.begin < previous_end)
            return fail(c, HPK_E_LAYOUT, "unwind entry %u: overlaps the previous entry", (unsigned)i);
        if ((rc = blob_ref(c, u.unwind_blob, &info, "unwind info of entry", i)) != HPK_OK)
            return rc;
        if (info.kind != HPK_BLOB_RODATA)
            return fail(c, HPK_E_LAYOUT, "unwind entry %u: unwind info blob is not read-only data", (unsigned)i);
        if (u.unwind_offset % 4 != 0 || info.alignment < 4)
            return fail(c, HPK_E_LAYOUT, "unwind entry %u: unwind info is not 4-byte aligned", (unsigned)i);
        if ((uint64_t)u.unwind_offset + 4 > info.size)
            return fail(c, HPK_E_LAYOUT, "unwind entry %u: unwind info is past its blob", (unsigned)i);
        p = info.data + u.unwind_offset;
        version = p[0] & 7u;
        flags = p[0] >> 3;
        count = p[2];
        if (version != 1 && version != 2)
            return fail(c, HPK_E_FIELD, "unwind entry %u: unwind info version %u", (unsigned)i, version);
        if ((flags & ~7u) != 0 || ((flags & 4u) && (flags & 3u)))
            return fail(c, HPK_E_FIELD, "unwind entry %u: unwind info flags 0x%x", (unsigned)i, flags);
        size = 4u + 2u * (count + (count & 1u));
        if (flags & 3u)
            size += 4;
        else if (flags & 4u)
            size += 12;
        if ((uint64_t)u.unwind_offset + size > info.size)
            return fail(c, HPK_E_LAYOUT, "unwind entry %u: unwind info runs past its blob", (unsigned)i);
        previous_blob = u.code_blob;
        previous_end = u.end;
    }
    return HPK_OK;
}

/* ================================================================ API */

int hpk_parse(const uint8_t *data, size_t size, hpk_package *out, char *err, size_t errlen)
{
    ctx c;
    int rc;
    if (err != NULL && errlen > 0)
        err[0] = '\0';
    if (out == NULL || (data == NULL && size > 0)) {
        if (err != NULL && errlen > 0)
            snprintf(err, errlen, "null argument");
        return HPK_E_ARGUMENT;
    }
    memset(out, 0, sizeof *out);
    memset(&c, 0, sizeof c);
    c.d = data;
    c.size = size;
    c.err = err;
    c.errlen = errlen;
    c.out = out;
    if ((rc = parse_header(&c)) != HPK_OK || (rc = check_hash(&c)) != HPK_OK ||
        (rc = parse_section_table(&c)) != HPK_OK || (rc = parse_strings(&c)) != HPK_OK ||
        (rc = parse_target(&c)) != HPK_OK || (rc = parse_baseline(&c)) != HPK_OK ||
        (rc = parse_metadata(&c)) != HPK_OK || (rc = parse_blobs(&c)) != HPK_OK ||
        (rc = parse_fixups(&c)) != HPK_OK || (rc = parse_sites(&c)) != HPK_OK ||
        (rc = parse_unwind(&c)) != HPK_OK || (rc = check_fixup_refs(&c)) != HPK_OK ||
        (rc = check_site_refs(&c)) != HPK_OK || (rc = check_unwind_refs(&c)) != HPK_OK) {
        memset(out, 0, sizeof *out);
        return rc;
    }
    out->data = data;
    out->size = size;
    return HPK_OK;
}

const char *hpk_strerror(int code)
{
    switch (code) {
    case HPK_OK: return "ok";
    case HPK_E_TRUNCATED: return "truncated package";
    case HPK_E_MAGIC: return "not a hotpatch package";
    case HPK_E_VERSION: return "unsupported format version";
    case HPK_E_HASH: return "content hash mismatch";
    case HPK_E_LIMIT: return "count or size beyond a limit";
    case HPK_E_LAYOUT: return "bad layout of sections or records";
    case HPK_E_FIELD: return "undefined field value";
    case HPK_E_ENCODING: return "bad string encoding";
    case HPK_E_ARGUMENT: return "bad argument";
    default: return "unknown error";
    }
}

int hpk_blob_at(const hpk_package *pkg, uint32_t index, hpk_blob *out)
{
    const uint8_t *r;
    if (pkg == NULL || out == NULL || index >= pkg->blob_count)
        return HPK_E_ARGUMENT;
    r = pkg->blob_table_ + BLOB_RECORD * (uint64_t)index;
    out->kind = r[0];
    out->alignment = 1u << r[1];
    out->size = rd32(r + 4);
    out->data = r[0] == HPK_BLOB_BSS ? NULL : pkg->blob_data_ + rd32(r + 8);
    return HPK_OK;
}

int hpk_fixup_at(const hpk_package *pkg, uint32_t index, hpk_fixup *out)
{
    const uint8_t *r;
    if (pkg == NULL || out == NULL || index >= pkg->fixup_count)
        return HPK_E_ARGUMENT;
    r = pkg->fixup_table_ + FIXUP_RECORD * (uint64_t)index;
    memset(out, 0, sizeof *out);
    out->blob = rd32(r);
    out->offset = rd32(r + 4);
    out->kind = r[8];
    out->target_kind = r[9];
    out->addend = (int64_t)rd64(r + 24);
    if (out->target_kind == HPK_TARGET_BASELINE_RVA) {
        out->target_rva = rd32(r + 12);
    } else if (out->target_kind == HPK_TARGET_BLOB) {
        out->target_blob = rd32(r + 12);
        out->target_offset = rd32(r + 16);
    } else {
        hpk_string_at(pkg, rd32(r + 12), &out->dll);
        hpk_string_at(pkg, rd32(r + 16), &out->name);
    }
    return HPK_OK;
}

int hpk_site_at(const hpk_package *pkg, uint32_t index, hpk_site *out)
{
    const uint8_t *r;
    if (pkg == NULL || out == NULL || index >= pkg->site_count)
        return HPK_E_ARGUMENT;
    r = pkg->site_table_ + SITE_RECORD * (uint64_t)index;
    memset(out, 0, sizeof *out);
    out->rva = rd32(r);
    hpk_string_at(pkg, rd32(r + 4), &out->function);
    out->target_blob = rd32(r + 8);
    out->target_offset = rd32(r + 12);
    out->strategy = r[16];
    out->fallback_count = r[17];
    out->fallbacks[0] = r[18];
    out->fallbacks[1] = r[19];
    out->expected_size = r[20];
    out->padding_size = r[21];
    out->has_padding = (rd16(r + 22) & SITE_HAS_PADDING) != 0;
    out->padding_rva = rd32(r + 24);
    out->expected = r + 32;
    out->padding_expected = r + 64;
    return HPK_OK;
}

int hpk_unwind_at(const hpk_package *pkg, uint32_t index, hpk_unwind *out)
{
    const uint8_t *r;
    if (pkg == NULL || out == NULL || index >= pkg->unwind_count)
        return HPK_E_ARGUMENT;
    r = pkg->unwind_table_ + UNWIND_RECORD * (uint64_t)index;
    out->code_blob = rd32(r);
    out->begin = rd32(r + 4);
    out->end = rd32(r + 8);
    out->unwind_blob = rd32(r + 12);
    out->unwind_offset = rd32(r + 16);
    return HPK_OK;
}

int hpk_string_at(const hpk_package *pkg, uint32_t index, hpk_str *out)
{
    const uint8_t *t;
    if (pkg == NULL || out == NULL || index >= pkg->string_count)
        return HPK_E_ARGUMENT;
    t = pkg->strings_;
    out->ptr = (const char *)(t + 8 + 8 * (uint64_t)pkg->string_count + rd32(t + 8 + 8 * (uint64_t)index));
    out->len = rd32(t + 12 + 8 * (uint64_t)index);
    return HPK_OK;
}

int hpk_cve_at(const hpk_package *pkg, uint32_t index, hpk_str *out)
{
    const uint8_t *p;
    uint32_t i;
    if (pkg == NULL || out == NULL || index >= pkg->cve_count)
        return HPK_E_ARGUMENT;
    p = pkg->cve_list_;
    for (i = 0; i < index; i++)
        p += 2u + rd16(p) + 1u;
    out->ptr = (const char *)(p + 2);
    out->len = rd16(p);
    return HPK_OK;
}

int hpk_signed_message(const hpk_package *pkg, uint8_t out[HPK_SIGNED_MESSAGE_SIZE])
{
    if (pkg == NULL || out == NULL || pkg->content_sha256 == NULL)
        return HPK_E_ARGUMENT;
    memcpy(out, HPK_SIGNATURE_CONTEXT, HPK_SIGNATURE_CONTEXT_SIZE); /* the literal's NUL is the 16th byte */
    memcpy(out + HPK_SIGNATURE_CONTEXT_SIZE, pkg->content_sha256, HPK_HASH_SIZE);
    return HPK_OK;
}
