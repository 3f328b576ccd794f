"""capstone's C entry points for the compiled modules, taken from the library the Python binding loaded
(``hotpatch.x86.capstone_symbol`` checks the version); inline, so each module fills its own copy."""

from hotpatch.analysis.includes.capstone cimport (
    CS_ARCH_X86, CS_ERR_OK, CS_MODE_64, CS_OPT_DETAIL, CS_OPT_ON, CapstoneAPI, cs_close_fn, cs_disasm_iter_fn,
    cs_free_fn, cs_insn, cs_malloc_fn, cs_open_fn, cs_option_fn, cs_regs_access_fn, csh,
)


cdef inline int load_entry_points(CapstoneAPI *api, str module) except -1:
    from hotpatch.x86 import capstone_symbol

    api.open = <cs_open_fn><size_t>capstone_symbol("cs_open", module)
    api.option = <cs_option_fn><size_t>capstone_symbol("cs_option", module)
    api.malloc = <cs_malloc_fn><size_t>capstone_symbol("cs_malloc", module)
    api.disasm_iter = <cs_disasm_iter_fn><size_t>capstone_symbol("cs_disasm_iter", module)
    api.regs_access = <cs_regs_access_fn><size_t>capstone_symbol("cs_regs_access", module)
    api.free = <cs_free_fn><size_t>capstone_symbol("cs_free", module)
    api.close = <cs_close_fn><size_t>capstone_symbol("cs_close", module)
    return 0


cdef inline int open_x86(CapstoneAPI *api, csh *handle, cs_insn **insn, bint detail) except -1:
    """An x86-64 handle (with details or without) and an instruction for ``disasm_iter``; nothing is done when
    ``insn`` already points at one, so a module-level pair is opened on first use. The caller closes both."""
    if insn[0] != NULL:
        return 0
    if api.open(CS_ARCH_X86, CS_MODE_64, handle) != CS_ERR_OK:
        raise RuntimeError("cs_open failed")
    if detail:
        api.option(handle[0], CS_OPT_DETAIL, CS_OPT_ON)
    insn[0] = api.malloc(handle[0])
    if insn[0] == NULL:
        raise MemoryError()
    return 0
