# Declarations of the parts of capstone's C API (5.0.x) the core uses.
# Layouts come from the wheel's own headers at build time; the functions are
# called through pointers taken from the libcapstone the Python package loaded.

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint64_t


cdef extern from "capstone/capstone.h" nogil:
    ctypedef size_t csh
    ctypedef int cs_arch
    ctypedef int cs_mode
    ctypedef int cs_err
    ctypedef int cs_opt_type
    ctypedef size_t cs_opt_value

    int CS_ARCH_X86
    int CS_MODE_64
    int CS_OPT_DETAIL
    int CS_OPT_ON
    int CS_ERR_OK
    int CS_GRP_JUMP
    int CS_GRP_CALL
    int CS_GRP_BRANCH_RELATIVE

    ctypedef struct x86_op_mem:
        int segment
        int base
        int index
        int scale
        int64_t disp

    ctypedef struct cs_x86_op:
        int type
        int reg
        int64_t imm
        x86_op_mem mem
        uint8_t size

    ctypedef struct cs_x86_encoding:
        uint8_t modrm_offset
        uint8_t disp_offset
        uint8_t disp_size
        uint8_t imm_offset
        uint8_t imm_size

    ctypedef struct cs_x86:
        int64_t disp
        uint8_t op_count
        cs_x86_op operands[8]
        cs_x86_encoding encoding

    ctypedef struct cs_detail:
        uint8_t groups[8]
        uint8_t groups_count
        cs_x86 x86

    ctypedef struct cs_insn:
        unsigned int id
        uint64_t address
        uint16_t size
        char mnemonic[32]
        char op_str[160]
        cs_detail *detail


cdef extern from "capstone/x86.h" nogil:
    int X86_OP_REG
    int X86_OP_IMM
    int X86_OP_MEM
    int X86_REG_RIP
    # the registers lea writes, by operand size and ModRM.reg + 8 * REX.R (_decode's LEA_REGISTER)
    int X86_REG_AX, X86_REG_CX, X86_REG_DX, X86_REG_BX, X86_REG_SP, X86_REG_BP, X86_REG_SI, X86_REG_DI, X86_REG_R8W, X86_REG_R9W, X86_REG_R10W, X86_REG_R11W, X86_REG_R12W, X86_REG_R13W, X86_REG_R14W, X86_REG_R15W
    int X86_REG_EAX, X86_REG_ECX, X86_REG_EDX, X86_REG_EBX, X86_REG_ESP, X86_REG_EBP, X86_REG_ESI, X86_REG_EDI, X86_REG_R8D, X86_REG_R9D, X86_REG_R10D, X86_REG_R11D, X86_REG_R12D, X86_REG_R13D, X86_REG_R14D, X86_REG_R15D
    int X86_REG_RAX, X86_REG_RCX, X86_REG_RDX, X86_REG_RBX, X86_REG_RSP, X86_REG_RBP, X86_REG_RSI, X86_REG_RDI, X86_REG_R8, X86_REG_R9, X86_REG_R10, X86_REG_R11, X86_REG_R12, X86_REG_R13, X86_REG_R14, X86_REG_R15
    int X86_REG_ENDING
    int X86_INS_LEA
    int X86_INS_CALL
    int X86_INS_JMP
    int X86_INS_JAE
    int X86_INS_JA
    int X86_INS_JBE
    int X86_INS_JB
    int X86_INS_JCXZ
    int X86_INS_JECXZ
    int X86_INS_JE
    int X86_INS_JGE
    int X86_INS_JG
    int X86_INS_JLE
    int X86_INS_JL
    int X86_INS_JNE
    int X86_INS_JNO
    int X86_INS_JNP
    int X86_INS_JNS
    int X86_INS_JO
    int X86_INS_JP
    int X86_INS_JRCXZ
    int X86_INS_JS
    int X86_INS_LOOP
    int X86_INS_LOOPE
    int X86_INS_LOOPNE
    int X86_INS_XBEGIN
    int X86_INS_ENDING
    int X86_INS_CMP
    int X86_INS_MOV
    int X86_INS_MOVSXD
    # the x86 numbers the verdict reads too (``_decode.X86_NUMBERS``)
    int X86_REG_AL, X86_REG_AH, X86_REG_BL, X86_REG_BH, X86_REG_CL, X86_REG_CH, X86_REG_DL, X86_REG_DH, X86_REG_SIL
    int X86_REG_DIL, X86_REG_BPL, X86_REG_SPL, X86_REG_R8B, X86_REG_R9B, X86_REG_R10B, X86_REG_R11B, X86_REG_R12B
    int X86_REG_R13B, X86_REG_R14B, X86_REG_R15B, X86_INS_RET, X86_INS_RETF, X86_INS_INT3, X86_INS_UD2, X86_INS_HLT
    int X86_INS_XOR, X86_INS_SUB, X86_INS_PXOR, X86_INS_SBB, X86_GRP_JUMP


ctypedef cs_err (*cs_open_fn)(cs_arch arch, cs_mode mode, csh *handle) noexcept nogil
ctypedef cs_err (*cs_option_fn)(csh handle, cs_opt_type kind, size_t value) noexcept nogil
ctypedef cs_insn *(*cs_malloc_fn)(csh handle) noexcept nogil
ctypedef bint (*cs_disasm_iter_fn)(csh handle, const uint8_t **code, size_t *size, uint64_t *address,
                                   cs_insn *insn) noexcept nogil
ctypedef void (*cs_free_fn)(cs_insn *insn, size_t count) noexcept nogil
ctypedef cs_err (*cs_close_fn)(csh *handle) noexcept nogil
# the registers an instruction reads and writes, explicit and implicit (cs_regs is uint16_t[64])
ctypedef cs_err (*cs_regs_access_fn)(csh handle, const cs_insn *insn, uint16_t *regs_read, uint8_t *read_count,
                                     uint16_t *regs_write, uint8_t *write_count) noexcept nogil


# Every entry point the compiled modules call, as one struct each module fills once at import
# (``hotpatch.analysis._capstone_api.load_entry_points``).
ctypedef struct CapstoneAPI:
    cs_open_fn open
    cs_option_fn option
    cs_malloc_fn malloc
    cs_disasm_iter_fn disasm_iter
    cs_regs_access_fn regs_access
    cs_free_fn free
    cs_close_fn close
