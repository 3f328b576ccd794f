/*
 * remote.c: calling a function inside the target on a new thread
 * (CreateRemoteThread), with one pointer-sized argument. The thread's exit
 * code (the low 32 bits of what the function returned) comes back; callers
 * that need more arguments or a 64-bit result write a small stub and an
 * argument block into the target first (see hotpatch/apply/backend.py).
 */
#include "agent.h"

int op_remote_call(request_t *rq, const args_t *a)
{
    uint32_t flags = a->flags, timeout_ms = a->timeout_ms;
    uint64_t function = a->address, argument = a->argument;
    target_t *t = target_get(rq, a->handle);
    HANDLE thread;
    DWORD tid = 0, code = 0, wait;

    if (!t)
        return rq->status;

    thread = CreateRemoteThread(t->process, NULL, 0, (LPTHREAD_START_ROUTINE)(uintptr_t)function,
                                (LPVOID)(uintptr_t)argument, 0, &tid);
    if (!thread)
        return target_fail(rq, t, "CreateRemoteThread", "function 0x%llx",
                           (unsigned long long)function);
    TRACE("remote thread %lu at 0x%llx", (unsigned long)tid, (unsigned long long)function);
    if (flags & CALL_NO_WAIT) {
        CloseHandle(thread);
        wr_u32(&rq->out, tid);
        wr_u32(&rq->out, STILL_ACTIVE);
        return ST_OK;
    }
    wait = WaitForSingleObject(thread, timeout_ms);
    if (wait != WAIT_OBJECT_0) {
        int status;
        if (wait == WAIT_TIMEOUT) {
            rq->thread_id = tid;
            status = fail(rq, ST_TIMEOUT, "remote thread %lu still running after %lu ms",
                          (unsigned long)tid, (unsigned long)timeout_ms);
        } else {
            status = fail_win32(rq, "WaitForSingleObject", "remote thread %lu", (unsigned long)tid);
        }
        CloseHandle(thread);
        return status;
    }
    if (!GetExitCodeThread(thread, &code)) {
        int status = fail_win32(rq, "GetExitCodeThread", "remote thread %lu", (unsigned long)tid);
        CloseHandle(thread);
        return status;
    }
    CloseHandle(thread);
    wr_u32(&rq->out, tid);
    wr_u32(&rq->out, code);
    return ST_OK;
}
