/*
 * hpk_check.c - check hotpatch packages with the C reader.
 *
 *   hpk_check FILE [--pubkey HEX] [--dump]
 *       exit 0 when the package is valid; else prints "FILE: E_<NAME> (<code>): <message>" and exits
 *       with the hpk_error code. --pubkey demands a signature block whose public key is HEX; the
 *       signature itself is NOT verified here (the C reader has no Ed25519): exit 10 when unsigned,
 *       11 when signed by another key. --dump prints the parsed package (the format the tests compare
 *       with the Python reader's).
 *   hpk_check --batch [--dump]
 *       the mutation tests' harness: reads packages framed as (u32 little-endian length, bytes) from
 *       stdin until EOF, and prints "case <index> <code> <signed>" for each (then the dump and "end"
 *       with --dump, for valid ones), flushing after each case, so a crash points at its case.
 *       Each package sits in a buffer of exactly its size, so AddressSanitizer sees any overread.
 */
#include "hpk_reader.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const CODE_NAMES[] = {"OK",     "E_TRUNCATED", "E_MAGIC",    "E_VERSION", "E_HASH",
                                         "E_LIMIT", "E_LAYOUT",   "E_FIELD",    "E_ENCODING", "E_ARGUMENT"};

static const char *code_name(int code)
{
    return code >= 0 && code <= HPK_E_ARGUMENT ? CODE_NAMES[code] : "E_UNKNOWN";
}

static void hex(FILE *out, const uint8_t *p, size_t n)
{
    size_t i;
    if (n == 0) {
        fputc('-', out);
        return;
    }
    for (i = 0; i < n; i++)
        fprintf(out, "%02x", p[i]);
}

static void hex_str(FILE *out, const hpk_str *s) { hex(out, (const uint8_t *)s->ptr, s->len); }

static void dump(FILE *out, const hpk_package *p)
{
    uint32_t i;
    fputs("package ", out);
    hex(out, p->content_sha256, HPK_HASH_SIZE);
    fputs("\ntarget ", out);
    hex_str(out, &p->module_name);
    fprintf(out, " %u %u %u ", (unsigned)p->timedatestamp, (unsigned)p->size_of_image, (unsigned)p->checksum);
    hex(out, p->code_sha256, 32);
    fputs("\nbaseline ", out);
    hex_str(out, &p->baseline_id);
    fprintf(out, " %u\nmetadata ", (unsigned)p->sequence);
    if (p->has_created)
        fprintf(out, "%llu ", (unsigned long long)p->created);
    else
        fputs("- ", out);
    hex_str(out, &p->description);
    fputc(' ', out);
    hex_str(out, &p->creator);
    fputc('\n', out);
    for (i = 0; i < p->cve_count; i++) {
        hpk_str cve;
        hpk_cve_at(p, i, &cve);
        fputs("cve ", out);
        hex_str(out, &cve);
        fputc('\n', out);
    }
    for (i = 0; i < p->blob_count; i++) {
        hpk_blob b;
        hpk_blob_at(p, i, &b);
        fprintf(out, "blob %u %u %u %u ", (unsigned)i, (unsigned)b.kind, (unsigned)b.alignment, (unsigned)b.size);
        hex(out, b.data, b.data == NULL ? 0 : b.size);
        fputc('\n', out);
    }
    for (i = 0; i < p->fixup_count; i++) {
        hpk_fixup f;
        hpk_fixup_at(p, i, &f);
        fprintf(out, "fixup %u %u %u %u ", (unsigned)f.blob, (unsigned)f.offset, (unsigned)f.kind,
                (unsigned)f.target_kind);
        if (f.target_kind == HPK_TARGET_BASELINE_RVA) {
            fprintf(out, "%u 0", (unsigned)f.target_rva);
        } else if (f.target_kind == HPK_TARGET_BLOB) {
            fprintf(out, "%u %u", (unsigned)f.target_blob, (unsigned)f.target_offset);
        } else {
            hex_str(out, &f.dll);
            fputc(' ', out);
            hex_str(out, &f.name);
        }
        fprintf(out, " %lld\n", (long long)f.addend);
    }
    for (i = 0; i < p->site_count; i++) {
        hpk_site s;
        uint8_t k;
        hpk_site_at(p, i, &s);
        fprintf(out, "site %u ", (unsigned)s.rva);
        hex_str(out, &s.function);
        fprintf(out, " %u %u %u ", (unsigned)s.target_blob, (unsigned)s.target_offset, (unsigned)s.strategy);
        if (s.fallback_count == 0)
            fputc('-', out);
        for (k = 0; k < s.fallback_count; k++)
            fprintf(out, k ? ",%u" : "%u", (unsigned)s.fallbacks[k]);
        fputc(' ', out);
        hex(out, s.expected, s.expected_size);
        if (s.has_padding)
            fprintf(out, " %u ", (unsigned)s.padding_rva);
        else
            fputs(" - ", out);
        hex(out, s.padding_expected, s.padding_size);
        fputc('\n', out);
    }
    for (i = 0; i < p->unwind_count; i++) {
        hpk_unwind u;
        hpk_unwind_at(p, i, &u);
        fprintf(out, "unwind %u %u %u %u %u\n", (unsigned)u.code_blob, (unsigned)u.begin, (unsigned)u.end,
                (unsigned)u.unwind_blob, (unsigned)u.unwind_offset);
    }
    if (p->has_signature) {
        uint8_t message[HPK_SIGNED_MESSAGE_SIZE];
        hpk_signed_message(p, message);
        fputs("signature ", out);
        hex(out, p->public_key, HPK_PUBLIC_KEY_SIZE);
        fputc(' ', out);
        hex(out, p->signature, HPK_SIGNATURE_SIZE);
        fputc(' ', out);
        hex(out, message, sizeof message);
        fputc('\n', out);
    } else {
        fputs("signature -\n", out);
    }
}

static int read_exact(FILE *in, uint8_t *buffer, size_t size)
{
    return fread(buffer, 1, size, in) == size;
}

static int run_batch(int with_dump)
{
    unsigned long index = 0;
    uint8_t frame[4];
    char err[256];
    while (read_exact(stdin, frame, 4)) {
        size_t size = (size_t)frame[0] | ((size_t)frame[1] << 8) | ((size_t)frame[2] << 16) | ((size_t)frame[3] << 24);
        uint8_t *buffer = malloc(size > 0 ? size : 1);
        hpk_package pkg;
        int rc;
        if (buffer == NULL || !read_exact(stdin, buffer, size)) {
            fprintf(stderr, "hpk_check: case %lu: short frame or out of memory\n", index);
            free(buffer);
            return 2;
        }
        rc = hpk_parse(size > 0 ? buffer : NULL, size, &pkg, err, sizeof err);
        printf("case %lu %d %d\n", index, rc, rc == HPK_OK ? pkg.has_signature : 0);
        if (rc == HPK_OK && with_dump) {
            dump(stdout, &pkg);
            puts("end");
        }
        fflush(stdout);
        free(buffer);
        index++;
    }
    return 0;
}

static int parse_hex32(const char *text, uint8_t out[32])
{
    size_t i;
    if (strlen(text) != 64)
        return 0;
    for (i = 0; i < 32; i++) {
        unsigned value;
        if (sscanf(text + 2 * i, "%2x", &value) != 1)
            return 0;
        out[i] = (uint8_t)value;
    }
    return 1;
}

static uint8_t *read_file(const char *path, size_t *size)
{
    FILE *f = fopen(path, "rb");
    size_t capacity = 1 << 16, used = 0, n;
    uint8_t *buffer;
    if (f == NULL)
        return NULL;
    buffer = malloc(capacity);
    while (buffer != NULL && (n = fread(buffer + used, 1, capacity - used, f)) > 0) {
        used += n;
        if (used > HPK_MAX_FILE_SIZE)
            break; /* the reader refuses it by size; no need to read more */
        if (used == capacity) {
            uint8_t *bigger = realloc(buffer, capacity * 2);
            if (bigger == NULL) {
                free(buffer);
                buffer = NULL;
                break;
            }
            buffer = bigger;
            capacity *= 2;
        }
    }
    fclose(f);
    *size = used;
    return buffer;
}

int main(int argc, char **argv)
{
    const char *path = NULL;
    uint8_t pubkey[32];
    int want_key = 0, with_dump = 0, batch = 0, i, rc;
    char err[256];
    size_t size = 0;
    uint8_t *data;
    hpk_package pkg;
    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--pubkey") == 0 && i + 1 < argc) {
            if (!parse_hex32(argv[++i], pubkey)) {
                fprintf(stderr, "hpk_check: --pubkey expects 64 hex digits\n");
                return 2;
            }
            want_key = 1;
        } else if (strcmp(argv[i], "--dump") == 0) {
            with_dump = 1;
        } else if (strcmp(argv[i], "--batch") == 0) {
            batch = 1;
        } else if (path == NULL && argv[i][0] != '-') {
            path = argv[i];
        } else {
            fprintf(stderr, "usage: hpk_check FILE [--pubkey HEX] [--dump] | hpk_check --batch [--dump]\n");
            return 2;
        }
    }
    if (batch)
        return run_batch(with_dump);
    if (path == NULL) {
        fprintf(stderr, "usage: hpk_check FILE [--pubkey HEX] [--dump] | hpk_check --batch [--dump]\n");
        return 2;
    }
    data = read_file(path, &size);
    if (data == NULL) {
        fprintf(stderr, "hpk_check: %s: cannot read\n", path);
        return 2;
    }
    rc = hpk_parse(data, size, &pkg, err, sizeof err);
    if (rc != HPK_OK) {
        printf("%s: %s (%d): %s\n", path, code_name(rc), rc, err);
        free(data);
        return rc;
    }
    if (with_dump)
        dump(stdout, &pkg);
    if (want_key) {
        if (!pkg.has_signature) {
            printf("%s: not signed\n", path);
            free(data);
            return 10;
        }
        if (memcmp(pkg.public_key, pubkey, 32) != 0) {
            printf("%s: signed by another key\n", path);
            free(data);
            return 11;
        }
        printf("%s: signed by the given key (signature not verified by the C reader)\n", path);
    }
    free(data);
    return 0;
}
