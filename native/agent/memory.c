/*
 * memory.c: reading, writing and querying the target's memory, allocating
 * near an address, protection changes, and the page sets COMMIT uses to make
 * code writable for the shortest time.
 */
#include "agent.h"

#include <stdlib.h>
#include <string.h>

#define MAX_QUERIES (1u << 20)

static SYSTEM_INFO g_si;

static const SYSTEM_INFO *system_info(void)
{
    if (!g_si.dwPageSize)
        GetSystemInfo(&g_si);
    return &g_si;
}

static uint64_t align_down(uint64_t v, uint64_t a) { return v & ~(a - 1); }
static uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) & ~(a - 1); }

/* ------------------------------------------------------------------------
 * Page sets: every page a set of writes touches, with its old protection.
 * --------------------------------------------------------------------- */
static int compare_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

int pages_add(request_t *rq, pages_t *set, uint64_t address, size_t len)
{
    uint64_t page = system_info()->dwPageSize;
    uint64_t first = align_down(address, page), n, i;
    /* Counted, not compared against the last page: near the top of the
     * address space p += page wraps to 0 and would never pass it. */
    if (len == 0 || address + len < address)
        return fail(rq, ST_BAD_PAYLOAD, "range 0x%llx+0x%llx wraps around the address space",
                    (unsigned long long)address, (unsigned long long)len);
    n = (align_down(address + len - 1, page) - first) / page + 1;
    for (i = 0; i < n; i++) {
        uint64_t p = first + i * page;
        if (set->count == set->cap) {
            size_t cap = set->cap ? set->cap * 2 : 16;
            uint64_t *pages = realloc(set->page, cap * sizeof *pages);
            if (!pages)
                return fail(rq, ST_LIMIT, "out of memory collecting pages");
            set->page = pages;
            set->cap = cap;
        }
        set->page[set->count++] = p;
    }
    return ST_OK;
}

void pages_free(pages_t *set)
{
    free(set->page);
    free(set->span);
    memset(set, 0, sizeof *set);
}

static int add_span(request_t *rq, pages_t *set, uint64_t start, uint64_t size, DWORD old)
{
    if (set->spans == set->span_cap) {
        size_t cap = set->span_cap ? set->span_cap * 2 : 16;
        span_t *grown = realloc(set->span, cap * sizeof *grown);
        if (!grown)
            return fail(rq, ST_LIMIT, "out of memory recording protections");
        set->span = grown;
        set->span_cap = cap;
    }
    set->span[set->spans].start = start;
    set->span[set->spans].size = size;
    set->span[set->spans].old = old;
    set->spans++;
    return ST_OK;
}

/* Page protections a write can go through as they are. */
#define WRITABLE_PROTECT (PAGE_READWRITE | PAGE_WRITECOPY | PAGE_EXECUTE_READWRITE | PAGE_EXECUTE_WRITECOPY)
#define EXECUTABLE_PROTECT (PAGE_EXECUTE | PAGE_EXECUTE_READ | PAGE_EXECUTE_READWRITE | PAGE_EXECUTE_WRITECOPY)

/*
 * Contiguous pages are changed in as few calls as possible: VirtualProtectEx
 * reports the old protection of the first page only, so a run is cut where
 * VirtualQueryEx says the protection changes. Pages already writable (the
 * engine's own allocation before it turns code RX) are left alone; read-only
 * data becomes PAGE_READWRITE; only pages that are executable already (the
 * image's code at a commit, whose other threads keep running on them outside
 * the pause) become PAGE_EXECUTE_READWRITE, until pages_relock.
 */
int pages_unlock(request_t *rq, target_t *t, pages_t *set)
{
    uint64_t page = system_info()->dwPageSize;
    size_t i, j, n = 0;

    qsort(set->page, set->count, sizeof *set->page, compare_u64);
    for (i = 0; i < set->count; i++)
        if (n == 0 || set->page[i] != set->page[n - 1])
            set->page[n++] = set->page[i];
    set->count = n;
    for (i = 0; i < set->count; i = j + 1) {
        uint64_t at = set->page[i], end;
        for (j = i; j + 1 < set->count && set->page[j + 1] == set->page[j] + page; j++)
            ;
        end = set->page[j] + page;
        while (at < end) {
            uint64_t size = end - at, region_end;
            MEMORY_BASIC_INFORMATION mbi;
            DWORD old, wanted;
            if (!VirtualQueryEx(t->process, (LPCVOID)(uintptr_t)at, &mbi, sizeof mbi)) {
                target_fail(rq, t, "VirtualQueryEx", "address 0x%llx", (unsigned long long)at);
                break;
            }
            region_end = (uint64_t)(uintptr_t)mbi.BaseAddress + mbi.RegionSize;
            if (region_end > at && region_end - at < size)
                size = region_end - at;
            if (mbi.State == MEM_COMMIT && (mbi.Protect & WRITABLE_PROTECT)) {
                at += size; /* writable as it is: no protection change, nothing to restore */
                continue;
            }
            wanted = (mbi.Protect & EXECUTABLE_PROTECT) ? PAGE_EXECUTE_READWRITE : PAGE_READWRITE;
            if (!VirtualProtectEx(t->process, (LPVOID)(uintptr_t)at, (SIZE_T)size, wanted, &old)) {
                target_fail(rq, t, "VirtualProtectEx", "making 0x%llx bytes at 0x%llx writable",
                            (unsigned long long)size, (unsigned long long)at);
                break;
            }
            if (add_span(rq, set, at, size, old)) {
                DWORD ignored;
                VirtualProtectEx(t->process, (LPVOID)(uintptr_t)at, (SIZE_T)size, old, &ignored);
                break;
            }
            at += size;
        }
        if (rq->status != ST_OK) {
            pages_relock(rq, t, set);
            return rq->status;
        }
    }
    return ST_OK;
}

int pages_relock(request_t *rq, target_t *t, pages_t *set)
{
    int status = ST_OK;
    size_t i;
    for (i = 0; i < set->spans; i++) {
        const span_t *span = &set->span[i];
        DWORD ignored;
        if (!VirtualProtectEx(t->process, (LPVOID)(uintptr_t)span->start, (SIZE_T)span->size,
                              span->old, &ignored) &&
            status == ST_OK && rq->status == ST_OK)
            status = target_fail(rq, t, "VirtualProtectEx",
                                 "restoring protection 0x%lx of 0x%llx bytes at 0x%llx",
                                 (unsigned long)span->old, (unsigned long long)span->size,
                                 (unsigned long long)span->start);
    }
    set->spans = 0;
    return status;
}

int write_raw(request_t *rq, target_t *t, uint64_t address, const uint8_t *data, size_t len)
{
    SIZE_T put = 0;
    if (!WriteProcessMemory(t->process, (LPVOID)(uintptr_t)address, data, len, &put) || put != len)
        return target_fail(rq, t, "WriteProcessMemory", "%lu bytes at 0x%llx (%lu written)",
                           (unsigned long)len, (unsigned long long)address, (unsigned long)put);
    return ST_OK;
}

int read_raw(request_t *rq, target_t *t, uint64_t address, uint8_t *data, size_t len)
{
    SIZE_T got = 0;
    if (!ReadProcessMemory(t->process, (LPCVOID)(uintptr_t)address, data, len, &got) || got != len)
        return target_fail(rq, t, "ReadProcessMemory", "%lu bytes at 0x%llx (%lu read)",
                           (unsigned long)len, (unsigned long long)address, (unsigned long)got);
    return ST_OK;
}

int write_through(request_t *rq, target_t *t, uint64_t address, const uint8_t *data, size_t len)
{
    pages_t set;
    int status;

    memset(&set, 0, sizeof set);
    if (pages_add(rq, &set, address, len) || pages_unlock(rq, t, &set)) {
        pages_free(&set);
        return rq->status;
    }
    status = write_raw(rq, t, address, data, len);
    if (status == ST_OK)
        FlushInstructionCache(t->process, (LPCVOID)(uintptr_t)address, len);
    if (pages_relock(rq, t, &set) && status == ST_OK)
        status = rq->status;
    pages_free(&set);
    return status;
}

/* ------------------------------------------------------------------------
 * READ, WRITE, QUERY
 * --------------------------------------------------------------------- */
int op_read(request_t *rq, const args_t *a)
{
    target_t *t = target_get(rq, a->handle);
    uint8_t *dest;

    if (!t)
        return rq->status;
    dest = wr_reserve(&rq->out, (size_t)a->size);
    if (!dest)
        return fail(rq, ST_LIMIT, "cannot hold %llu bytes", (unsigned long long)a->size);
    return read_raw(rq, t, a->address, dest, (size_t)a->size);
}

int op_write(request_t *rq, const args_t *a)
{
    target_t *t = target_get(rq, a->handle);

    if (!t)
        return rq->status;
    return write_through(rq, t, a->address, a->data, (size_t)a->size);
}

static void put_region(writer_t *w, const MEMORY_BASIC_INFORMATION *mbi)
{
    wr_u64(w, (uint64_t)(uintptr_t)mbi->BaseAddress);
    wr_u64(w, (uint64_t)(uintptr_t)mbi->AllocationBase);
    wr_u64(w, (uint64_t)mbi->RegionSize);
    wr_u32(w, mbi->AllocationProtect);
    wr_u32(w, mbi->State);
    wr_u32(w, mbi->Protect);
    wr_u32(w, mbi->Type);
}

int op_query(request_t *rq, const args_t *a)
{
    target_t *t = target_get(rq, a->handle);
    MEMORY_BASIC_INFORMATION mbi;

    if (!t)
        return rq->status;
    if (!VirtualQueryEx(t->process, (LPCVOID)(uintptr_t)a->address, &mbi, sizeof mbi))
        return target_fail(rq, t, "VirtualQueryEx", "address 0x%llx", (unsigned long long)a->address);
    put_region(&rq->out, &mbi);
    return ST_OK;
}

/* ------------------------------------------------------------------------
 * ALLOC_NEAR: like Detours, walk the regions around the anchor address with
 * VirtualQueryEx, alternately upward and downward so the nearest free
 * granule-aligned block wins, and reserve+commit it there. Every byte of
 * the block lies within max_distance of the anchor.
 * --------------------------------------------------------------------- */
typedef struct {
    target_t *t;
    request_t *rq;
    uint64_t size, lo, hi, gran; /* hi: highest acceptable base */
    DWORD protect;
    uint64_t found;
    int done; /* 1 found, -1 hard failure */
} search_t;

static int try_alloc(search_t *s, uint64_t base)
{
    LPVOID p;
    if (base < s->lo || base > s->hi)
        return 0;
    p = VirtualAllocEx(s->t->process, (LPVOID)(uintptr_t)base, s->size, MEM_RESERVE | MEM_COMMIT,
                       s->protect);
    if (p) {
        s->found = (uint64_t)(uintptr_t)p;
        s->done = 1;
        return 1;
    }
    /* Taken meanwhile (or not quite free): keep looking. Anything else is real. */
    if (GetLastError() != ERROR_INVALID_ADDRESS) {
        target_fail(s->rq, s->t, "VirtualAllocEx", "0x%llx bytes at 0x%llx",
                    (unsigned long long)s->size, (unsigned long long)base);
        s->done = -1;
        return 1;
    }
    return 0;
}

/* One step upward from *cursor; sets *cursor past the region it looked at. */
static void step_up(search_t *s, uint64_t *cursor)
{
    MEMORY_BASIC_INFORMATION mbi;
    uint64_t base, end, next;
    if (!VirtualQueryEx(s->t->process, (LPCVOID)(uintptr_t)*cursor, &mbi, sizeof mbi)) {
        *cursor = UINT64_MAX; /* past the end of user space */
        return;
    }
    base = (uint64_t)(uintptr_t)mbi.BaseAddress;
    end = base + mbi.RegionSize;
    if (mbi.State == MEM_FREE) {
        uint64_t candidate = align_up(base > *cursor ? base : *cursor, s->gran);
        if (candidate + s->size <= end && try_alloc(s, candidate))
            return;
    }
    next = align_up(end, s->gran);
    *cursor = next > *cursor ? next : *cursor + s->gran;
}

/* One step downward from *cursor; 0 in *cursor once nothing lies below. */
static void step_down(search_t *s, uint64_t *cursor)
{
    MEMORY_BASIC_INFORMATION mbi;
    uint64_t base, end, start;
    if (!VirtualQueryEx(s->t->process, (LPCVOID)(uintptr_t)*cursor, &mbi, sizeof mbi)) {
        *cursor = 0;
        return;
    }
    base = (uint64_t)(uintptr_t)mbi.BaseAddress;
    end = base + mbi.RegionSize;
    if (mbi.State == MEM_FREE && end - base >= s->size) {
        uint64_t candidate = align_down(end - s->size, s->gran);
        if (candidate > s->hi)
            candidate = align_down(s->hi, s->gran);
        if (candidate >= base && try_alloc(s, candidate))
            return;
    }
    start = base;
    if (mbi.State != MEM_FREE && mbi.AllocationBase &&
        (uint64_t)(uintptr_t)mbi.AllocationBase < start)
        start = (uint64_t)(uintptr_t)mbi.AllocationBase;
    *cursor = start >= s->gran ? align_down(start - 1, s->gran) : 0;
}

int op_alloc_near(request_t *rq, const args_t *a)
{
    const SYSTEM_INFO *si = system_info();
    target_t *t = target_get(rq, a->handle);
    uint32_t protect = a->protect;
    uint64_t anchor = a->address, size = a->size, distance = a->distance, up, down, app_lo, app_hi;
    unsigned queries = 0;
    search_t s;

    if (!t)
        return rq->status;

    if (anchor == 0) {
        LPVOID p = VirtualAllocEx(t->process, NULL, size, MEM_RESERVE | MEM_COMMIT, protect);
        if (!p)
            return target_fail(rq, t, "VirtualAllocEx", "0x%llx bytes anywhere", (unsigned long long)size);
        wr_u64(&rq->out, (uint64_t)(uintptr_t)p);
        return ST_OK;
    }

    memset(&s, 0, sizeof s);
    s.t = t;
    s.rq = rq;
    s.size = size;
    s.protect = protect;
    s.gran = si->dwAllocationGranularity;
    app_lo = align_up((uint64_t)(uintptr_t)si->lpMinimumApplicationAddress, s.gran);
    app_hi = (uint64_t)(uintptr_t)si->lpMaximumApplicationAddress;
    s.lo = anchor > distance ? align_up(anchor - distance, s.gran) : 0;
    if (s.lo < app_lo)
        s.lo = app_lo;
    s.hi = anchor + distance >= anchor ? anchor + distance - size : UINT64_MAX;
    if (app_hi + 1 - size < s.hi)
        s.hi = app_hi + 1 - size;
    if (size > distance || s.lo > s.hi)
        return fail(rq, ST_NO_SPACE, "no room for 0x%llx bytes within 0x%llx of 0x%llx",
                    (unsigned long long)size, (unsigned long long)distance, (unsigned long long)anchor);

    up = align_down(anchor, s.gran);
    if (up < s.lo)
        up = s.lo;
    down = up >= s.gran ? up - s.gran : 0;
    while (!s.done && queries < MAX_QUERIES && (up <= s.hi || (down >= s.lo && down != 0))) {
        if (up <= s.hi) {
            step_up(&s, &up);
            queries++;
        }
        if (!s.done && down >= s.lo && down != 0) {
            step_down(&s, &down);
            queries++;
        }
    }
    TRACE("alloc anchor 0x%llx: %u queries", (unsigned long long)anchor, queries);
    if (s.done < 0)
        return rq->status;
    if (!s.done)
        return fail(rq, ST_NO_SPACE, "no free 0x%llx bytes within 0x%llx of 0x%llx",
                    (unsigned long long)size, (unsigned long long)distance, (unsigned long long)anchor);
    wr_u64(&rq->out, s.found);
    return ST_OK;
}

/* ------------------------------------------------------------------------
 * FREE, PROTECT, FLUSH
 * --------------------------------------------------------------------- */
int op_free(request_t *rq, const args_t *a)
{
    target_t *t = target_get(rq, a->handle);

    if (!t)
        return rq->status;
    if (!VirtualFreeEx(t->process, (LPVOID)(uintptr_t)a->address, 0, MEM_RELEASE))
        return target_fail(rq, t, "VirtualFreeEx", "address 0x%llx", (unsigned long long)a->address);
    return ST_OK;
}

int op_protect(request_t *rq, const args_t *a)
{
    target_t *t = target_get(rq, a->handle);
    uint32_t protect = a->protect;
    uint64_t address = a->address, size = a->size;
    DWORD old = 0;

    if (!t)
        return rq->status;
    if (!VirtualProtectEx(t->process, (LPVOID)(uintptr_t)address, size, protect, &old))
        return target_fail(rq, t, "VirtualProtectEx", "0x%llx bytes at 0x%llx to 0x%lx",
                           (unsigned long long)size, (unsigned long long)address, (unsigned long)protect);
    wr_u32(&rq->out, old);
    return ST_OK;
}

int op_flush(request_t *rq, const args_t *a)
{
    target_t *t = target_get(rq, a->handle);
    uint64_t address = a->address, size = a->size;

    if (!t)
        return rq->status;
    if (!FlushInstructionCache(t->process, (LPCVOID)(uintptr_t)address, size))
        return target_fail(rq, t, "FlushInstructionCache", "0x%llx bytes at 0x%llx",
                           (unsigned long long)size, (unsigned long long)address);
    return ST_OK;
}
