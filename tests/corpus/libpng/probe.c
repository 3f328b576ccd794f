/*
 * libpng probes: decode and encode small images held in memory through the
 * simplified API (png_image_*) and the classic one, each reaching code that
 * one of Debian's CVE patches changes. Every call owns its png_struct, so the
 * probes run from many threads at once.
 *
 * The classic-API probes give libpng an allocator of their own (an arena per
 * call): the unfixed steps read freed memory and past the end of blocks (the
 * CVEs' own bugs), and over the process heap such reads return whatever another
 * thread left there, or fault when the heap has given the page back, killing
 * the host. Over the arena they read the same bytes on every call and never
 * leave it, so the unfixed value is one stable value and the host lives.
 */
#include <png.h>
#include <setjmp.h>
#include <stdlib.h>

#include "../probe.h"
#include "libpng_inputs.h"

/* ── the simplified API ─────────────────────────────────────────────────── */

/* Read into a buffer twice the size the format needs, pre-filled, and hash
 * all of it: a write past the rows the format needs shows up too. */
static int64_t read_simple(const unsigned char *png, size_t size, png_uint_32 format)
{
    png_image image;
    unsigned char *buffer;
    size_t need, total;
    uint32_t h = FNV_START;
    int ok;

    memset(&image, 0, sizeof image);
    image.version = PNG_IMAGE_VERSION;
    if (!png_image_begin_read_from_memory(&image, png, size))
        return pack(1, fnv_str(h, image.message));
    image.format = format;
    need = PNG_IMAGE_SIZE(image);
    total = 2 * need + 64;
    buffer = malloc(total);
    if (!buffer) {
        png_image_free(&image);
        return pack(9, 0);
    }
    memset(buffer, 0x80, total);
    ok = png_image_finish_read(&image, NULL, buffer, 0, NULL);
    h = fnv(h, buffer, total);
    if (!ok)
        h = fnv_str(h, image.message);
    png_image_free(&image);
    free(buffer);
    return pack(ok ? 0 : 2, h);
}

PROBE png_pal_trns_rgb(void)
{
    return read_simple(png_pal_trns, sizeof png_pal_trns, PNG_FORMAT_RGB);
}

PROBE png_flat16_rgba8(void)
{
    return read_simple(png_rgba16_flat, sizeof png_rgba16_flat, PNG_FORMAT_RGBA);
}

PROBE png_interlaced16_rgba8(void)
{
    return read_simple(png_rgba16_interlaced, sizeof png_rgba16_interlaced, PNG_FORMAT_RGBA);
}

PROBE png_flat8_linear(void)
{
    return read_simple(png_rgb8, sizeof png_rgb8, PNG_FORMAT_LINEAR_RGB);
}

static int64_t write_simple(png_uint_32 width, png_uint_32 height, png_uint_32 format, int convert_to_8bit,
                            const void *pixels, png_int_32 row_stride)
{
    png_image image;
    png_alloc_size_t size = 0;
    unsigned char *out;
    uint32_t h = FNV_START;
    int ok;

    memset(&image, 0, sizeof image);
    image.version = PNG_IMAGE_VERSION;
    image.width = width;
    image.height = height;
    image.format = format;
    if (!png_image_write_get_memory_size(image, size, convert_to_8bit, pixels, row_stride, NULL))
        return pack(1, fnv_str(h, image.message));
    out = malloc(size);
    if (!out)
        return pack(9, 0);
    ok = png_image_write_to_memory(&image, out, &size, convert_to_8bit, pixels, row_stride, NULL);
    h = ok ? fnv(h, out, size) : fnv_str(h, image.message);
    free(out);
    png_image_free(&image);
    return pack(ok ? 0 : 2, h);
}

/* 8-bit RGB written with convert_to_8bit: before CVE-2025-64506 the rows went
 * through the 16-bit converter, which reads twice the row (the buffer is
 * twice as big and filled, so that read stays inside it). */
PROBE png_write8_convert(void)
{
    unsigned char pixels[2 * 6 * 4 * 3];
    size_t i;
    for (i = 0; i < sizeof pixels; i++)
        pixels[i] = (unsigned char)(i * 7 + 3);
    return write_simple(6, 4, PNG_FORMAT_RGB, 1, pixels, 0);
}

/* 16-bit linear RGBA with a row stride above 32767 components: before
 * CVE-2026-22801 the row advance was truncated to 16 bits. */
PROBE png_write_linear_stride(void)
{
    enum { STRIDE = 33000, HEIGHT = 3 };
    uint16_t *pixels = malloc(sizeof(uint16_t) * STRIDE * HEIGHT);
    int64_t result;
    size_t i;
    if (!pixels)
        return pack(9, 0);
    for (i = 0; i < (size_t)STRIDE * HEIGHT; i++)
        pixels[i] = (uint16_t)(i * 2654435761u >> 16);
    result = write_simple(2, HEIGHT, PNG_FORMAT_LINEAR_RGB_ALPHA, 0, pixels, STRIDE);
    free(pixels);
    return result;
}

/* ── the classic API ────────────────────────────────────────────────────── */

typedef struct {
    const unsigned char *data;
    size_t size, pos;
} reader_t;

static void read_fn(png_structp png_ptr, png_bytep out, size_t length)
{
    reader_t *r = (reader_t *)png_get_io_ptr(png_ptr);
    if (length > r->size - r->pos)
        png_error(png_ptr, "read past the end");
    memcpy(out, r->data + r->pos, length);
    r->pos += length;
}

static void quiet(png_structp png_ptr, png_const_charp message)
{
    (void)png_ptr;
    (void)message;
}

/* ── the arena behind the classic API's allocations ─────────────────────── */

/* Blocks are never reused and a freed one is filled with ARENA_FREED, as a
 * checking allocator would: a use after free reads that pattern, a read past a
 * block reads the next block or the untouched fill, and a double free is
 * harmless. The arena is big enough for every probe's decode; running out is
 * reported as status 8 rather than passed off as libpng's own out-of-memory. */
enum { ARENA_SIZE = 1 << 20, ARENA_HEADER = 16, ARENA_FILL = 0xA5, ARENA_FREED = 0xDD };

typedef struct {
    unsigned char *base;
    size_t used;
    int exhausted;
} arena_t;

static png_voidp arena_malloc(png_structp png_ptr, png_alloc_size_t size)
{
    arena_t *arena = (arena_t *)png_get_mem_ptr(png_ptr);
    size_t need = ARENA_HEADER + ((size + 15) & ~(size_t)15);
    unsigned char *block;

    if (size > ARENA_SIZE || need > ARENA_SIZE - arena->used) {
        arena->exhausted = 1;
        return NULL;
    }
    block = arena->base + arena->used;
    arena->used += need;
    memcpy(block, &size, sizeof size);
    return block + ARENA_HEADER;
}

static void arena_free(png_structp png_ptr, png_voidp ptr)
{
    arena_t *arena = (arena_t *)png_get_mem_ptr(png_ptr);
    unsigned char *block = (unsigned char *)ptr;
    size_t size;

    /* only blocks of this arena, and never past what it handed out (a header overwritten by the
     * unfixed code must not turn the fill into a wild write) */
    if (!block || block < arena->base + ARENA_HEADER || block >= arena->base + arena->used)
        return;
    memcpy(&size, block - ARENA_HEADER, sizeof size);
    if (size > (size_t)(arena->base + arena->used - block))
        size = (size_t)(arena->base + arena->used - block);
    memset(block, ARENA_FREED, size);
}

typedef enum { QUANTIZE, GETSET_PLTE, GETSET_TEXT, PALETTE_SYNC } classic_t;

static uint32_t hash_rows(png_structp png_ptr, png_infop info_ptr, uint32_t h)
{
    size_t rowbytes = png_get_rowbytes(png_ptr, info_ptr);
    png_uint_32 y, height = png_get_image_height(png_ptr, info_ptr);
    unsigned char *row = malloc(rowbytes + 16);
    if (!row)
        png_error(png_ptr, "out of memory");
    for (y = 0; y < height; y++) {
        memset(row, 0x55, rowbytes + 16);
        png_read_row(png_ptr, row, NULL);
        h = fnv(h, row, rowbytes);
    }
    free(row);
    return h;
}

static uint32_t hash_info(png_structp png_ptr, png_infop info_ptr, uint32_t h)
{
    png_colorp palette = NULL;
    png_bytep trans = NULL;
    png_uint_16p hist = NULL;
    png_textp text = NULL;
    int n = 0, i;

    if (png_get_PLTE(png_ptr, info_ptr, &palette, &n))
        h = fnv(h, palette, (size_t)n * sizeof *palette);
    n = 0;
    if (png_get_tRNS(png_ptr, info_ptr, &trans, &n, NULL))
        h = fnv(h, trans, (size_t)n);
    if (png_get_hIST(png_ptr, info_ptr, &hist))
        h = fnv(h, hist, 16 * sizeof *hist);
    n = png_get_text(png_ptr, info_ptr, &text, NULL);
    for (i = 0; i < n; i++) {
        h = fnv_str(h, text[i].key);
        h = fnv_str(h, text[i].text);
    }
    return h;
}

static int64_t classic_in(arena_t *arena, const unsigned char *png, size_t size, classic_t what)
{
    reader_t reader = {png, size, 0};
    png_structp png_ptr = png_create_read_struct_2(PNG_LIBPNG_VER_STRING, NULL, quiet, quiet, arena,
                                                   arena_malloc, arena_free);
    png_infop info_ptr;
    volatile uint32_t h = FNV_START;

    if (!png_ptr)
        return pack(9, 0);
    info_ptr = png_create_info_struct(png_ptr);
    if (!info_ptr || setjmp(png_jmpbuf(png_ptr))) {
        png_destroy_read_struct(&png_ptr, &info_ptr, NULL);
        return pack(3, h);
    }
    png_set_read_fn(png_ptr, &reader, read_fn);
    png_read_info(png_ptr, info_ptr);
    if (what == QUANTIZE) {
        png_colorp palette;
        int n;
        png_get_PLTE(png_ptr, info_ptr, &palette, &n);
        png_set_quantize(png_ptr, palette, n, 5, NULL, 0);
        png_read_update_info(png_ptr, info_ptr);
        h = hash_rows(png_ptr, info_ptr, h);
    } else if (what == GETSET_PLTE) {
        /* Getter to setter with the library's own arrays (CVE-2026-34757). */
        png_colorp palette;
        png_bytep trans;
        png_uint_16p hist;
        int n, t;
        png_get_PLTE(png_ptr, info_ptr, &palette, &n);
        png_set_PLTE(png_ptr, info_ptr, palette, n);
        if (png_get_tRNS(png_ptr, info_ptr, &trans, &t, NULL)) {
            png_set_tRNS(png_ptr, info_ptr, trans, t, NULL);
            /* png_set_tRNS allocates all 256 entries; those past num_trans were left uninitialised
             * before CVE-2026-33416 part 2 (the arena's fill), 0xff (opaque) after it */
            if (png_get_tRNS(png_ptr, info_ptr, &trans, &t, NULL))
                h = fnv(h, trans, PNG_MAX_PALETTE_LENGTH);
        }
        if (png_get_hIST(png_ptr, info_ptr, &hist))
            png_set_hIST(png_ptr, info_ptr, hist);
        png_set_expand(png_ptr);
        png_read_update_info(png_ptr, info_ptr);
        h = hash_rows(png_ptr, info_ptr, h);
    } else if (what == GETSET_TEXT) {
        /* Text chunks added again from a copy of the array png_get_text gives:
         * png_set_text_2 (CVE-2026-34757 part 2) runs, but without the aliasing
         * itself, whose use after free reads key pointers out of a freed block
         * and may crash the host at any time, before or after a patch. */
        png_textp text;
        png_text copy[8];
        int n;
        png_read_update_info(png_ptr, info_ptr);
        h = hash_rows(png_ptr, info_ptr, h);
        png_read_end(png_ptr, info_ptr);
        n = png_get_text(png_ptr, info_ptr, &text, NULL);
        if (n > 8)
            n = 8;
        memcpy(copy, text, (size_t)n * sizeof *text);
        png_set_text(png_ptr, info_ptr, copy, n);
    } else {
        /* Gamma correction rewrites the palette in png_struct: does png_info see it? */
        png_set_gamma(png_ptr, 2.2, 1.0);
        png_read_update_info(png_ptr, info_ptr);
        h = hash_rows(png_ptr, info_ptr, h);
    }
    h = hash_info(png_ptr, info_ptr, h);
    png_destroy_read_struct(&png_ptr, &info_ptr, NULL);
    return pack(0, h);
}

static int64_t classic(const unsigned char *png, size_t size, classic_t what)
{
    arena_t arena = {malloc(ARENA_SIZE), 0, 0};
    int64_t result;

    if (!arena.base)
        return pack(9, 0);
    memset(arena.base, ARENA_FILL, ARENA_SIZE);
    result = classic_in(&arena, png, size, what);
    free(arena.base);
    return arena.exhausted ? pack(8, 0) : result;
}

PROBE png_quantize(void)
{
    return classic(png_pal_trns, sizeof png_pal_trns, QUANTIZE);
}

PROBE png_quantize_oob(void)
{
    return classic(png_pal_oob, sizeof png_pal_oob, QUANTIZE);
}

PROBE png_getset_plte(void)
{
    return classic(png_pal_gamma_text, sizeof png_pal_gamma_text, GETSET_PLTE);
}

PROBE png_getset_text(void)
{
    return classic(png_pal_gamma_text, sizeof png_pal_gamma_text, GETSET_TEXT);
}

PROBE png_palette_sync(void)
{
    return classic(png_pal_gamma_text, sizeof png_pal_gamma_text, PALETTE_SYNC);
}
