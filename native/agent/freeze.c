/*
 * freeze.c: stopping the world. Suspends every thread of the target, reads
 * their contexts, and on top of that: COMMIT (check no instruction pointer is
 * inside the bytes to change, verify, write, flush, resume), the floor (the
 * same freeze and thaw with nothing written), and THREAD_CONTEXTS.
 *
 * The pause is measured with QueryPerformanceCounter from the first
 * suspension to the return of the last resume call. Pages are made writable before the
 * freeze and restored after the thaw, so the pause holds only the freeze
 * itself, the verifying reads, the writes and the flushes.
 */
#include "agent.h"

#include <stdlib.h>
#include <string.h>

#define THREAD_ACCESS \
    (THREAD_SUSPEND_RESUME | THREAD_GET_CONTEXT | THREAD_QUERY_INFORMATION | SYNCHRONIZE)
#define MAX_FREEZE_ROUNDS 16
#define STACK_CHUNK 65536

/* ------------------------------------------------------------------------
 * Clock
 * --------------------------------------------------------------------- */
static uint64_t now_ticks(void)
{
    LARGE_INTEGER t;
    QueryPerformanceCounter(&t);
    return (uint64_t)t.QuadPart;
}

static uint64_t ticks_to_ns(uint64_t ticks)
{
    LARGE_INTEGER f;
    uint64_t freq;
    QueryPerformanceFrequency(&f);
    freq = f.QuadPart > 0 ? (uint64_t)f.QuadPart : 1;
    return ticks / freq * 1000000000ull + ticks % freq * 1000000000ull / freq;
}

/* ------------------------------------------------------------------------
 * NT entry points (ntdll exports on Vista and later, and in Wine): NULL when
 * missing, and the freeze falls back to Toolhelp32 and SuspendThread.
 * --------------------------------------------------------------------- */
typedef LONG(NTAPI *next_thread_fn)(HANDLE, HANDLE, ACCESS_MASK, ULONG, ULONG, PHANDLE);
typedef LONG(NTAPI *process_fn)(HANDLE);

#define STATUS_NO_MORE_ENTRIES_ ((LONG)0x8000001AL)

static struct {
    int looked;
    next_thread_fn next_thread;
    process_fn suspend_process, resume_process;
} g_nt;

static void (*nt_proc(HMODULE ntdll, const char *name))(void)
{
    FARPROC proc = ntdll ? GetProcAddress(ntdll, name) : NULL;
    return (void (*)(void))proc;
}

static void nt_init(void)
{
    HMODULE ntdll;
    if (g_nt.looked)
        return;
    ntdll = GetModuleHandleW(L"ntdll.dll");
    g_nt.next_thread = (next_thread_fn)nt_proc(ntdll, "NtGetNextThread");
    g_nt.suspend_process = (process_fn)nt_proc(ntdll, "NtSuspendProcess");
    g_nt.resume_process = (process_fn)nt_proc(ntdll, "NtResumeProcess");
    g_nt.looked = 1;
}

/* Records a failed NT call: the error code field carries the NTSTATUS. */
static int fail_nt(request_t *rq, const char *call, LONG status, DWORD pid)
{
    fail(rq, ST_WIN32, "%s failed with NTSTATUS 0x%08lx (pid %lu)", call, (unsigned long)status,
         (unsigned long)pid);
    rq->win32_error = (DWORD)status;
    snprintf(rq->call, sizeof rq->call, "%s", call);
    return ST_WIN32;
}

/* ------------------------------------------------------------------------
 * Freeze and thaw
 *
 * Two methods. By default the whole process is suspended with one
 * NtSuspendProcess (threads it creates meanwhile start suspended) and
 * resumed with one NtResumeProcess; its threads are then opened one by one
 * (NtGetNextThread) only to read their contexts. The other method
 * (FREEZE_PER_THREAD, and the fallback) suspends each thread with
 * SuspendThread, sweeping again until a sweep finds no new thread. Under
 * Wine every call is a wineserver round trip, so one call instead of one
 * per thread keeps the pause short, the resume above all.
 * --------------------------------------------------------------------- */
#define REPORT_SUSPENDED 1u  /* reply flags */
#define REPORT_PER_THREAD 2u

typedef struct {
    DWORD tid;
    HANDLE thread;
    uint64_t rip, rsp;
} frozen_t;

typedef struct {
    HANDLE process;
    int whole_process;
    frozen_t *threads;
    size_t count, cap;
    uint64_t first_suspend, last_resume; /* QPC ticks */
} freeze_t;

static int gone(HANDLE thread)
{
    return WaitForSingleObject(thread, 0) == WAIT_OBJECT_0;
}

static int known(const freeze_t *f, DWORD tid)
{
    size_t i;
    for (i = 0; i < f->count; i++)
        if (f->threads[i].tid == tid)
            return 1;
    return 0;
}

static void thaw(freeze_t *f)
{
    size_t i;
    if (f->whole_process) {
        g_nt.resume_process(f->process);
        f->last_resume = now_ticks();
        f->whole_process = 0;
    } else {
        for (i = 0; i < f->count; i++)
            ResumeThread(f->threads[i].thread);
        if (f->count)
            f->last_resume = now_ticks();
    }
    for (i = 0; i < f->count; i++)
        CloseHandle(f->threads[i].thread);
    free(f->threads);
    f->threads = NULL;
    f->count = f->cap = 0;
}

/* Takes ownership of an opened thread handle, suspending the thread unless
 * the whole process is: 1 if kept, 0 if it has exited (handle left to the
 * caller), -1 with rq set on error. */
static int adopt(request_t *rq, freeze_t *f, HANDLE thread, DWORD tid)
{
    if (f->count == f->cap) {
        size_t cap = f->cap ? f->cap * 2 : 32;
        frozen_t *grown = cap <= AGENT_MAX_THREADS ? realloc(f->threads, cap * sizeof *grown) : NULL;
        if (!grown) {
            fail(rq, ST_LIMIT, "cannot track more than %lu threads", (unsigned long)f->count);
            return -1;
        }
        f->threads = grown;
        f->cap = cap;
    }
    if (!f->whole_process) {
        if (!f->first_suspend)
            f->first_suspend = now_ticks();
        if (SuspendThread(thread) == (DWORD)-1) {
            if (gone(thread))
                return 0;
            fail_win32(rq, "SuspendThread", "thread %lu", (unsigned long)tid);
            return -1;
        }
    }
    f->threads[f->count].tid = tid;
    f->threads[f->count].thread = thread;
    f->threads[f->count].rip = f->threads[f->count].rsp = 0;
    f->count++;
    return 1;
}

/* One pass over the threads with NtGetNextThread: adopts those not known
 * yet and returns how many, or -1 with rq set. */
static long sweep_native(request_t *rq, target_t *t, freeze_t *f)
{
    HANDLE cursor = NULL, next = NULL;
    int owned = 0; /* whether f owns the cursor handle */
    long added = 0;

    for (;;) {
        LONG status = g_nt.next_thread(t->process, cursor, THREAD_ACCESS, 0, 0, &next);
        DWORD tid;
        int r;
        if (cursor && !owned)
            CloseHandle(cursor);
        if (status == STATUS_NO_MORE_ENTRIES_)
            return added;
        if (status < 0) {
            fail_nt(rq, "NtGetNextThread", status, t->pid);
            return -1;
        }
        tid = GetThreadId(next);
        r = known(f, tid) ? 0 : adopt(rq, f, next, tid);
        if (r < 0) {
            CloseHandle(next);
            return -1;
        }
        added += r;
        cursor = next;
        owned = r == 1;
    }
}

/* The same from a Toolhelp32 snapshot of every thread of the system. */
static long sweep_toolhelp(request_t *rq, target_t *t, freeze_t *f)
{
    DWORD *ids;
    size_t n, i;
    long added = 0;

    if (!thread_ids(rq, t->pid, &ids, &n))
        return -1;
    for (i = 0; i < n; i++) {
        HANDLE thread;
        int r;
        if (known(f, ids[i]))
            continue;
        thread = OpenThread(THREAD_ACCESS, FALSE, ids[i]);
        if (!thread) {
            if (GetLastError() == ERROR_INVALID_PARAMETER)
                continue; /* exited since the snapshot */
            fail_win32(rq, "OpenThread", "thread %lu", (unsigned long)ids[i]);
            free(ids);
            return -1;
        }
        r = adopt(rq, f, thread, ids[i]);
        if (r <= 0)
            CloseHandle(thread);
        if (r < 0) {
            free(ids);
            return -1;
        }
        added += r;
    }
    free(ids);
    return added;
}

/*
 * Suspends every thread of the target, then reads each one's context.
 * GetThreadContext also makes sure the thread has really stopped
 * (suspension is asynchronous) before its RIP is trusted.
 */
static int freeze(request_t *rq, target_t *t, freeze_t *f, uint32_t flags)
{
    int round;
    size_t i;

    nt_init();
    memset(f, 0, sizeof *f);
    f->process = t->process;
    if (t->pid == GetCurrentProcessId())
        return fail(rq, ST_BAD_PAYLOAD, "the agent cannot freeze its own threads");
    if (!(flags & FREEZE_PER_THREAD) && g_nt.suspend_process && g_nt.resume_process &&
        g_nt.next_thread) {
        LONG status;
        f->first_suspend = now_ticks();
        status = g_nt.suspend_process(t->process);
        if (status < 0) {
            if (WaitForSingleObject(t->process, 0) == WAIT_OBJECT_0)
                return fail(rq, ST_NO_PROCESS, "process %lu has exited", (unsigned long)t->pid);
            return fail_nt(rq, "NtSuspendProcess", status, t->pid);
        }
        f->whole_process = 1;
        if (sweep_native(rq, t, f) < 0) {
            thaw(f);
            return rq->status;
        }
    } else {
        for (round = 0; round < MAX_FREEZE_ROUNDS; round++) {
            long added = g_nt.next_thread ? sweep_native(rq, t, f) : sweep_toolhelp(rq, t, f);
            if (added < 0) {
                thaw(f);
                return rq->status;
            }
            if (added == 0)
                break;
        }
    }
    if (f->count == 0) {
        thaw(f);
        if (WaitForSingleObject(t->process, 0) == WAIT_OBJECT_0)
            return fail(rq, ST_NO_PROCESS, "process %lu has exited", (unsigned long)t->pid);
        return fail(rq, ST_NO_PROCESS, "process %lu has no threads", (unsigned long)t->pid);
    }
    for (i = 0; i < f->count; i++) {
        CONTEXT ctx;
        memset(&ctx, 0, sizeof ctx);
        ctx.ContextFlags = CONTEXT_CONTROL;
        if (!GetThreadContext(f->threads[i].thread, &ctx)) {
            if (gone(f->threads[i].thread))
                continue;
            fail_win32(rq, "GetThreadContext", "thread %lu", (unsigned long)f->threads[i].tid);
            thaw(f);
            return rq->status;
        }
        f->threads[i].rip = ctx.Rip;
        f->threads[i].rsp = ctx.Rsp;
    }
    TRACE("froze %lu threads of pid %lu (%s) in %llu us", (unsigned long)f->count,
          (unsigned long)t->pid, f->whole_process ? "process" : "per thread",
          (unsigned long long)(ticks_to_ns(now_ticks() - f->first_suspend) / 1000));
    return ST_OK;
}

/* ------------------------------------------------------------------------
 * COMMIT
 * --------------------------------------------------------------------- */
/* MISMATCH unless every write's target still holds its expected bytes. */
static int verify(request_t *rq, target_t *t, const cwrite_t *writes, uint32_t count)
{
    uint8_t found[AGENT_MAX_WRITE];
    uint32_t i;
    for (i = 0; i < count; i++) {
        if (read_raw(rq, t, writes[i].address, found, writes[i].length))
            return rq->status;
        if (memcmp(found, writes[i].expected, writes[i].length) != 0) {
            memcpy(rq->data, found, writes[i].length);
            rq->data_len = writes[i].length;
            rq->address = writes[i].address;
            return fail(rq, ST_MISMATCH, "write %lu: the %u bytes at 0x%llx are not the expected ones",
                        (unsigned long)i, (unsigned)writes[i].length,
                        (unsigned long long)writes[i].address);
        }
    }
    return ST_OK;
}

/* The first thread whose RIP is strictly inside a write; NULL if none is. */
static const frozen_t *inside(const freeze_t *f, const cwrite_t *writes, uint32_t count,
                              uint32_t *which)
{
    size_t i;
    uint32_t j;
    for (i = 0; i < f->count; i++)
        for (j = 0; j < count; j++)
            if (f->threads[i].rip > writes[j].address &&
                f->threads[i].rip < writes[j].address + writes[j].length) {
                *which = j;
                return &f->threads[i];
            }
    return NULL;
}

/* Writes in order; on failure puts back what was written, newest first. */
static int apply_writes(request_t *rq, target_t *t, const cwrite_t *writes, uint32_t count)
{
    uint32_t i, done;
    for (done = 0; done < count; done++)
        if (write_raw(rq, t, writes[done].address, writes[done].replacement, writes[done].length))
            break;
    if (done == count) {
        for (i = 0; i < count; i++)
            FlushInstructionCache(t->process, (LPCVOID)(uintptr_t)writes[i].address,
                                  writes[i].length);
        return ST_OK;
    }
    for (i = done; i > 0; i--) {
        SIZE_T put = 0;
        const cwrite_t *w = &writes[i - 1];
        if (!WriteProcessMemory(t->process, (LPVOID)(uintptr_t)w->address, w->expected, w->length,
                                &put) ||
            put != w->length) {
            DWORD error = GetLastError(), first_error = rq->win32_error;
            char first_call[sizeof rq->call];
            snprintf(first_call, sizeof first_call, "%s", rq->call);
            fail(rq, ST_ROLLBACK_FAILED,
                 "write %lu failed (%s, error %lu) and restoring write %lu at 0x%llx failed too: "
                 "the target holds a partial commit",
                 (unsigned long)done, first_call, (unsigned long)first_error, (unsigned long)(i - 1),
                 (unsigned long long)w->address);
            rq->win32_error = error;
            rq->address = w->address;
            snprintf(rq->call, sizeof rq->call, "WriteProcessMemory");
            return ST_ROLLBACK_FAILED;
        }
        FlushInstructionCache(t->process, (LPCVOID)(uintptr_t)w->address, w->length);
    }
    return rq->status;
}

/* ------------------------------------------------------------------------
 * Writes while frozen, coalesced: with threads stopped, sites that lie on
 * adjacent pages are read, checked, patched and written back as one span,
 * one call each instead of one per site (under Wine every call is a round
 * trip to the wine server, and the pause is what they add up to).
 * --------------------------------------------------------------------- */
#define SPAN_PAGE 4096u
#define SPAN_MAX (256u * 1024u)

/* The sites' span when every page in it holds a site (so all were unlocked); 0 when not. */
static uint64_t coalescible_span(const cwrite_t *writes, uint32_t count, uint64_t *low)
{
    const cwrite_t **sorted;
    uint64_t lo, hi, reach;
    uint32_t i;
    if (count < 2)
        return 0;
    sorted = malloc(count * sizeof *sorted);
    if (!sorted)
        return 0;
    for (i = 0; i < count; i++)
        sorted[i] = &writes[i];
    qsort(sorted, count, sizeof *sorted, cwrite_compare);
    lo = sorted[0]->address;
    hi = sorted[0]->address + sorted[0]->length;
    for (i = 1; i < count; i++) {
        reach = (hi - 1) / SPAN_PAGE + 1; /* the page after the last one covered so far */
        if (sorted[i]->address / SPAN_PAGE > reach)
            break;                        /* a page with no site in between */
        if (sorted[i]->address + sorted[i]->length > hi)
            hi = sorted[i]->address + sorted[i]->length;
    }
    free(sorted);
    if (i < count || hi - lo > SPAN_MAX)
        return 0;
    *low = lo;
    return hi - lo;
}

/* verify + apply_writes for frozen threads, in one read and one write when the span allows. */
static int apply_frozen(request_t *rq, target_t *t, const cwrite_t *writes, uint32_t count)
{
    uint64_t lo = 0, size = coalescible_span(writes, count, &lo);
    uint8_t *now, *original;
    uint32_t i;
    int status;
    if (size == 0) {
        status = verify(rq, t, writes, count);
        return status == ST_OK ? apply_writes(rq, t, writes, count) : status;
    }
    now = malloc(2 * size);
    if (!now)
        return fail(rq, ST_LIMIT, "no memory for a %llu-byte commit span", (unsigned long long)size);
    original = now + size;
    if (read_raw(rq, t, lo, now, size)) {
        free(now);
        return rq->status;
    }
    memcpy(original, now, size);
    for (i = 0; i < count; i++) {
        uint8_t *at = now + (writes[i].address - lo);
        if (memcmp(at, writes[i].expected, writes[i].length) != 0) {
            memcpy(rq->data, at, writes[i].length);
            rq->data_len = writes[i].length;
            rq->address = writes[i].address;
            free(now);
            return fail(rq, ST_MISMATCH, "write %lu: the %u bytes at 0x%llx are not the expected ones",
                        (unsigned long)i, (unsigned)writes[i].length, (unsigned long long)writes[i].address);
        }
        memcpy(at, writes[i].replacement, writes[i].length);
    }
    status = write_raw(rq, t, lo, now, size);
    if (status != ST_OK && write_raw(rq, t, lo, original, size) != ST_OK)
        status = fail(rq, ST_ROLLBACK_FAILED, "writing the %llu-byte span at 0x%llx failed and so did "
                      "restoring it: the target holds a partial commit", (unsigned long long)size,
                      (unsigned long long)lo);
    FlushInstructionCache(t->process, (LPCVOID)(uintptr_t)lo, (SIZE_T)size);
    free(now);
    return status;
}

static void put_report(request_t *rq, uint64_t pause_ticks, uint64_t total_ticks, uint32_t attempts,
                       uint32_t threads, uint32_t flags)
{
    wr_u64(&rq->out, ticks_to_ns(pause_ticks));
    wr_u64(&rq->out, ticks_to_ns(total_ticks));
    wr_u32(&rq->out, attempts);
    wr_u32(&rq->out, threads);
    wr_u32(&rq->out, flags);
}

int op_commit(request_t *rq, const args_t *a)
{
    uint32_t flags = a->flags, max_attempts = a->max_attempts, retry_ms = a->retry_ms;
    uint32_t count = a->count, i, attempts = 0, busy_write = 0;
    uint64_t started = now_ticks(), pause = 0;
    uint32_t frozen_threads = 0, report = 0;
    int suspend = 0, status = ST_OK;
    target_t *t = target_get(rq, a->handle);
    const cwrite_t *writes = a->writes;
    pages_t pages;
    freeze_t f;

    if (!t)
        return rq->status;
    for (i = 0; i < count; i++)
        suspend |= !writes[i].no_suspend;
    memset(&f, 0, sizeof f);

    /* Outside the pause: a first check, and the pages made writable. */
    memset(&pages, 0, sizeof pages);
    if (verify(rq, t, writes, count))
        return rq->status;
    for (i = 0; i < count; i++)
        if (pages_add(rq, &pages, writes[i].address, writes[i].length))
            break;
    if (rq->status || pages_unlock(rq, t, &pages)) {
        pages_free(&pages);
        return rq->status;
    }

    if (!suspend) {
        /* Each write is atomic on its own (the caller orders them). */
        attempts = 1;
        status = verify(rq, t, writes, count);
        if (status == ST_OK)
            status = apply_writes(rq, t, writes, count);
    } else {
        int busy = 0;
        for (attempts = 1; attempts <= max_attempts; attempts++) {
            const frozen_t *in;
            status = freeze(rq, t, &f, flags);
            if (status)
                break;
            in = inside(&f, writes, count, &busy_write);
            busy = in != NULL;
            if (!busy)
                break;
            rq->thread_id = in->tid;
            rq->address = in->rip;
            TRACE("attempt %lu: thread %lu busy at 0x%llx", (unsigned long)attempts,
                  (unsigned long)in->tid, (unsigned long long)in->rip);
            thaw(&f);
            if (attempts < max_attempts && retry_ms)
                Sleep(retry_ms);
        }
        if (status == ST_OK && busy) {
            attempts = max_attempts;
            status = fail(rq, ST_BUSY,
                          "thread %lu stayed at 0x%llx inside write %lu [0x%llx, +%u) through %lu attempts",
                          (unsigned long)rq->thread_id, (unsigned long long)rq->address,
                          (unsigned long)busy_write, (unsigned long long)writes[busy_write].address,
                          (unsigned)writes[busy_write].length, (unsigned long)max_attempts);
        } else if (status == ST_OK) {
            frozen_threads = (uint32_t)f.count;
            report = REPORT_SUSPENDED | (f.whole_process ? 0 : REPORT_PER_THREAD);
            status = apply_frozen(rq, t, writes, count);
            thaw(&f);
            pause = f.last_resume - f.first_suspend;
        }
    }

    if (pages_relock(rq, t, &pages) && status == ST_OK)
        status = rq->status;
    pages_free(&pages);
    if (status != ST_OK)
        return status;
    put_report(rq, pause, now_ticks() - started, attempts, frozen_threads, report);
    return ST_OK;
}

/* ------------------------------------------------------------------------
 * FLOOR: the commit's freeze and thaw with nothing written.
 * --------------------------------------------------------------------- */
int op_floor(request_t *rq, const args_t *a)
{
    uint64_t started = now_ticks();
    uint32_t threads;
    int whole_process;
    target_t *t = target_get(rq, a->handle);
    freeze_t f;

    if (!t)
        return rq->status;
    if (freeze(rq, t, &f, a->flags))
        return rq->status;
    threads = (uint32_t)f.count;
    whole_process = f.whole_process;
    thaw(&f);
    put_report(rq, f.last_resume - f.first_suspend, now_ticks() - started, 1, threads,
               REPORT_SUSPENDED | (whole_process ? 0 : REPORT_PER_THREAD));
    return ST_OK;
}

/* ------------------------------------------------------------------------
 * THREAD_CONTEXTS: RIP and RSP of every thread, and how many stack slots
 * between RSP and the stack base point into a watched range (to tell
 * whether code is still in use before freeing it).
 * --------------------------------------------------------------------- */
typedef LONG(NTAPI *query_thread_fn)(HANDLE, int, PVOID, ULONG, PULONG);

typedef struct {
    LONG exit_status;
    PVOID teb;
    PVOID client_process, client_thread;
    ULONG_PTR affinity;
    LONG priority, base_priority;
} thread_basic_info_t;

static uint64_t stack_base(target_t *t, HANDLE thread)
{
    static query_thread_fn query;
    thread_basic_info_t info;
    uint64_t base = 0;
    SIZE_T got = 0;

    if (!query) {
        HMODULE ntdll = GetModuleHandleW(L"ntdll.dll");
        FARPROC proc = ntdll ? GetProcAddress(ntdll, "NtQueryInformationThread") : NULL;
        if (!proc)
            return 0;
        query = (query_thread_fn)(void (*)(void))proc;
    }
    memset(&info, 0, sizeof info);
    if (query(thread, 0 /* ThreadBasicInformation */, &info, sizeof info, NULL) < 0 || !info.teb)
        return 0;
    /* NT_TIB.StackBase follows the exception list pointer. */
    if (!ReadProcessMemory(t->process, (const uint8_t *)info.teb + 8, &base, sizeof base, &got) ||
        got != sizeof base)
        return 0;
    return base;
}

static uint32_t stack_hits(target_t *t, uint64_t rsp, uint64_t base, uint64_t lo, uint64_t size)
{
    static uint64_t chunk[STACK_CHUNK / 8];
    uint64_t at = rsp & ~7ull, end = base;
    uint32_t hits = 0;
    size_t i;

    if (end <= at || end - at > AGENT_MAX_STACK_SCAN)
        end = at + AGENT_MAX_STACK_SCAN < at ? at : at + AGENT_MAX_STACK_SCAN;
    while (at < end) {
        SIZE_T want = end - at > STACK_CHUNK ? STACK_CHUNK : (SIZE_T)(end - at), got = 0;
        if (!ReadProcessMemory(t->process, (LPCVOID)(uintptr_t)at, chunk, want, &got) || got == 0)
            break;
        for (i = 0; i < got / 8; i++)
            if (chunk[i] - lo < size)
                hits++;
        at += got;
    }
    return hits;
}

int op_thread_contexts(request_t *rq, const args_t *a)
{
    uint64_t watch = a->address, watch_size = a->size;
    target_t *t = target_get(rq, a->handle);
    freeze_t f;
    size_t i;

    if (!t)
        return rq->status;
    if (freeze(rq, t, &f, a->flags))
        return rq->status;
    wr_u64(&rq->out, 0); /* pause, filled in below */
    wr_u32(&rq->out, (uint32_t)f.count);
    for (i = 0; i < f.count; i++) {
        uint64_t base = stack_base(t, f.threads[i].thread);
        wr_u32(&rq->out, f.threads[i].tid);
        wr_u32(&rq->out, watch_size && base ? stack_hits(t, f.threads[i].rsp, base, watch, watch_size) : 0);
        wr_u64(&rq->out, f.threads[i].rip);
        wr_u64(&rq->out, f.threads[i].rsp);
        wr_u64(&rq->out, base);
    }
    thaw(&f);
    if (!rq->out.overflow) {
        uint64_t ns = ticks_to_ns(f.last_resume - f.first_suspend);
        for (i = 0; i < 8; i++)
            rq->out.data[AGENT_HEADER_SIZE + i] = (uint8_t)(ns >> (8 * i));
    }
    return ST_OK;
}
