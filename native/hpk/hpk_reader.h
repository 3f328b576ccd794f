/*
 * hpk_reader.h - the C reader of hotpatch packages (.hpk, format version 1).
 *
 * The format is specified in docs/FORMAT.md. hpk_parse() checks every field
 * and bound of a package held in memory, in the validation order the spec
 * gives (the same order as the Python reader, so both report the same error
 * family), and fills an hpk_package that points into the caller's buffer.
 * It allocates nothing; the buffer must outlive the hpk_package.
 *
 * Signatures: the reader does not verify Ed25519. It reports whether a
 * signature block is present and exposes the public key, the signature and
 * the signed message (hpk_signed_message), so the caller can verify it with
 * the crypto library it already has. A caller that needs authenticity must
 * do so before trusting anything in the package.
 *
 * All multi-byte fields are little-endian; the reader decodes them byte by
 * byte, so it works on any host.
 */
#ifndef HPK_READER_H
#define HPK_READER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------ format */

#define HPK_FORMAT_VERSION 1u
#define HPK_HEADER_SIZE 32u
#define HPK_SECTION_COUNT 9u
#define HPK_SECTION_ENTRY_SIZE 16u
#define HPK_HASH_SIZE 32u
#define HPK_PUBLIC_KEY_SIZE 32u
#define HPK_SIGNATURE_SIZE 64u
#define HPK_SIGNATURE_BLOCK_SIZE (HPK_PUBLIC_KEY_SIZE + HPK_SIGNATURE_SIZE)
/* the signature signs HPK_SIGNATURE_CONTEXT (16 bytes: 15 characters and the NUL) || content SHA-256 */
#define HPK_SIGNATURE_CONTEXT "hotpatch.hpk.v1"
#define HPK_SIGNATURE_CONTEXT_SIZE 16u
#define HPK_SIGNED_MESSAGE_SIZE (HPK_SIGNATURE_CONTEXT_SIZE + HPK_HASH_SIZE)

/* ------------------------------------------------------------------ limits */

#define HPK_MAX_FILE_SIZE (256u << 20)
#define HPK_MAX_BLOBS 65536u
#define HPK_MAX_BLOB_SIZE (64u << 20)
#define HPK_MAX_TOTAL_BLOB_SIZE (256u << 20)
#define HPK_MAX_FIXUPS (1u << 20)
#define HPK_MAX_SITES 65536u
#define HPK_MAX_UNWIND (1u << 18)
#define HPK_MAX_STRINGS (1u << 21)
#define HPK_MAX_STRING_BYTES 4096u
#define HPK_MAX_CVE_IDS 1024u
#define HPK_MAX_EXPECTED 32u
#define HPK_MAX_ALIGN_LOG2 12u

/* ------------------------------------------------------------------ errors */

typedef enum hpk_error {
    HPK_OK = 0,
    HPK_E_TRUNCATED = 1, /* the file ends before a structure it declares */
    HPK_E_MAGIC = 2,     /* not a package */
    HPK_E_VERSION = 3,   /* unsupported format version */
    HPK_E_HASH = 4,      /* content SHA-256 mismatch */
    HPK_E_LIMIT = 5,     /* a count or size beyond a documented limit */
    HPK_E_LAYOUT = 6,    /* overlapping, out-of-order or out-of-range sections and records */
    HPK_E_FIELD = 7,     /* a value the format does not define (enum, reserved, flags) */
    HPK_E_ENCODING = 8,  /* a string is not valid UTF-8, holds NUL, or lacks its terminator */
    HPK_E_ARGUMENT = 9   /* the caller passed a null pointer or an index out of range */
} hpk_error;

const char *hpk_strerror(int code);

/* ------------------------------------------------------------------ enums */

enum hpk_blob_kind { HPK_BLOB_CODE = 1, HPK_BLOB_RODATA = 2, HPK_BLOB_DATA = 3, HPK_BLOB_BSS = 4 };
enum hpk_fixup_kind { HPK_FIXUP_REL32 = 1, HPK_FIXUP_ABS64 = 2, HPK_FIXUP_IMAGE_REL32 = 3, HPK_FIXUP_ALLOC_REL32 = 4 };
enum hpk_target_kind { HPK_TARGET_BASELINE_RVA = 1, HPK_TARGET_BLOB = 2, HPK_TARGET_IMPORT = 3 };
enum hpk_strategy { HPK_SHORT_JMP_PADDING = 1, HPK_REL32_JMP = 2, HPK_ABS_JMP = 3 };

/* ------------------------------------------------------------------ model */

/* A string inside the package: valid UTF-8, no NUL inside, and NUL-terminated
 * in the buffer, so ptr can be used as a C string too. */
typedef struct hpk_str {
    const char *ptr;
    uint32_t len;
} hpk_str;

typedef struct hpk_blob {
    uint8_t kind;          /* enum hpk_blob_kind */
    uint32_t alignment;    /* power of 2, 1..4096 */
    uint32_t size;         /* bytes in memory */
    const uint8_t *data;   /* size bytes; NULL for BSS (zero-initialised) */
} hpk_blob;

typedef struct hpk_fixup {
    uint32_t blob;
    uint32_t offset;       /* of the 4- or 8-byte field inside the blob */
    uint8_t kind;          /* enum hpk_fixup_kind */
    uint8_t target_kind;   /* enum hpk_target_kind */
    uint32_t target_rva;   /* HPK_TARGET_BASELINE_RVA */
    uint32_t target_blob;  /* HPK_TARGET_BLOB */
    uint32_t target_offset;
    hpk_str dll;           /* HPK_TARGET_IMPORT */
    hpk_str name;
    int64_t addend;
} hpk_fixup;

typedef struct hpk_site {
    uint32_t rva;
    hpk_str function;
    uint32_t target_blob;
    uint32_t target_offset;
    uint8_t strategy;            /* enum hpk_strategy */
    uint8_t fallback_count;      /* 0..2 */
    uint8_t fallbacks[2];
    uint8_t expected_size;       /* 1..32 */
    const uint8_t *expected;     /* original bytes at rva */
    int has_padding;
    uint32_t padding_rva;
    uint8_t padding_size;        /* 0 or 5..32 */
    const uint8_t *padding_expected;
} hpk_site;

typedef struct hpk_unwind {
    uint32_t code_blob;
    uint32_t begin;              /* [begin, end) inside the code blob */
    uint32_t end;
    uint32_t unwind_blob;        /* RODATA blob holding the UNWIND_INFO */
    uint32_t unwind_offset;
} hpk_unwind;

typedef struct hpk_package {
    const uint8_t *data;         /* the caller's buffer */
    size_t size;
    uint32_t format_version;
    size_t content_size;         /* bytes covered by the content hash */
    const uint8_t *content_sha256;
    int has_signature;           /* a signature block is present (NOT verified) */
    const uint8_t *public_key;   /* 32 bytes, or NULL */
    const uint8_t *signature;    /* 64 bytes, or NULL */

    hpk_str module_name;
    uint32_t timedatestamp;
    uint32_t size_of_image;
    uint32_t checksum;
    const uint8_t *code_sha256;  /* 32 bytes */

    hpk_str baseline_id;
    uint32_t sequence;

    hpk_str description;
    hpk_str creator;
    int has_created;
    uint64_t created;            /* seconds since the Unix epoch, UTC */
    uint32_t cve_count;

    uint32_t string_count;
    uint32_t blob_count;
    uint32_t fixup_count;
    uint32_t site_count;
    uint32_t unwind_count;

    /* private: validated record tables inside data, read through the accessors */
    const uint8_t *cve_list_;
    size_t cve_list_size_;
    const uint8_t *strings_;
    const uint8_t *blob_table_;
    const uint8_t *blob_data_;
    const uint8_t *fixup_table_;
    const uint8_t *site_table_;
    const uint8_t *unwind_table_;
} hpk_package;

/* ------------------------------------------------------------------ API */

/* Check the package in data[0..size) and describe it in *out. Returns HPK_OK,
 * or an hpk_error with a one-line message in err (when err and errlen > 0).
 * On failure *out is cleared. Runs in time linear in size. */
int hpk_parse(const uint8_t *data, size_t size, hpk_package *out, char *err, size_t errlen);

/* Records of a parsed package, by index; HPK_E_ARGUMENT when out of range. */
int hpk_blob_at(const hpk_package *pkg, uint32_t index, hpk_blob *out);
int hpk_fixup_at(const hpk_package *pkg, uint32_t index, hpk_fixup *out);
int hpk_site_at(const hpk_package *pkg, uint32_t index, hpk_site *out);
int hpk_unwind_at(const hpk_package *pkg, uint32_t index, hpk_unwind *out);
int hpk_string_at(const hpk_package *pkg, uint32_t index, hpk_str *out);
int hpk_cve_at(const hpk_package *pkg, uint32_t index, hpk_str *out); /* walks the list: O(index) */

/* The 48 bytes the Ed25519 signature signs: the context, then the content SHA-256. */
int hpk_signed_message(const hpk_package *pkg, uint8_t out[HPK_SIGNED_MESSAGE_SIZE]);

/* SHA-256 (FIPS 180-4), as used for the content hash. */
void hpk_sha256(const uint8_t *data, size_t size, uint8_t out[32]);

#ifdef __cplusplus
}
#endif

#endif /* HPK_READER_H */
