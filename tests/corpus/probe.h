/*
 * Shared by the corpus probe DLLs: each probe is an export host.exe calls with
 * no arguments from several threads; it drives the library through one input
 * and returns (status << 32) | FNV-1a hash of what the library produced, so a
 * fix that changes the output changes the value host.exe observes.
 */
#ifndef CORPUS_PROBE_H
#define CORPUS_PROBE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define PROBE __declspec(dllexport) int64_t

#define FNV_START 2166136261u

static inline uint32_t fnv(uint32_t h, const void *data, size_t size)
{
    const unsigned char *p = (const unsigned char *)data;
    size_t i;
    for (i = 0; i < size; i++) {
        h ^= p[i];
        h *= 16777619u;
    }
    return h;
}

static inline uint32_t fnv_str(uint32_t h, const char *text)
{
    return text ? fnv(h, text, strlen(text)) : fnv(h, "(null)", 6);
}

static inline int64_t pack(int status, uint32_t hash)
{
    return ((int64_t)status << 32) | (int64_t)hash;
}

#endif
