"""capstone's C entry points for the compiled modules, taken from the library the Python binding loaded
(``hotpatch.x86.capstone_symbol`` checks the version); inline, so each module fills its own copy."""

from hotpatch.analysis.includes.capstone cimport (
    CapstoneAPI, cs_close_fn, cs_disasm_iter_fn, cs_free_fn, cs_malloc_fn, cs_open_fn, cs_option_fn,
    cs_regs_access_fn,
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
