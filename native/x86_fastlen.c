/*
 * x86_fastlen: instruction lengths of the most common x86-64 encodings.
 * See x86_fastlen.h for the contract. C99.
 */
#include "x86_fastlen.h"

/* ── operand-shape tables ────────────────────────────────────────────── */

enum {
    UNKNOWN = 0, /* leave to capstone */
    PLAIN,       /* opcode only */
    MODRM,       /* ModRM (+SIB/disp) */
    MODRM_I8,    /* ModRM + imm8 */
    MODRM_IZ,    /* ModRM + imm16/32 (operand-size dependent) */
    I8,          /* imm8 */
    IZ,          /* imm16/32 */
    IV,          /* imm16/32/64 (mov r, imm with REX.W takes 64) */
    BRANCH,      /* relative branch: always interesting, let capstone size it */
    GROUP        /* ModRM-reg dependent: handled in code */
};

/* One-byte opcode map, limited to encodings valid in 64-bit mode. */
static uint8_t one_byte_map(uint8_t op)
{
    if (op < 0x40) {
        switch (op & 7) {
        case 0: case 1: case 2: case 3: return MODRM;     /* add/or/adc/sbb/and/sub/xor/cmp */
        case 4: return I8;
        case 5: return IZ;
        default: return UNKNOWN; /* segment prefixes, daa/das/aaa/aas and the 0F escape */
        }
    }
    if (op >= 0x50 && op <= 0x5F) return PLAIN;             /* push/pop r64 */
    if (op >= 0x70 && op <= 0x7F) return BRANCH;            /* jcc rel8 */
    if (op >= 0x84 && op <= 0x8B) return MODRM;             /* test, xchg, mov */
    if (op >= 0x90 && op <= 0x99) return PLAIN;             /* nop/xchg, cwde/cdqe, cdq/cqo */
    if (op >= 0xB0 && op <= 0xB7) return I8;                /* mov r8, imm8 */
    if (op >= 0xB8 && op <= 0xBF) return IV;                /* mov r, imm */
    if (op >= 0xD0 && op <= 0xD3) return GROUP;             /* shifts by 1/cl */
    switch (op) {
    case 0x63: return MODRM;                                /* movsxd */
    case 0x68: return IZ;                                   /* push imm32 */
    case 0x69: return MODRM_IZ;                             /* imul r, r/m, imm */
    case 0x6A: return I8;                                   /* push imm8 */
    case 0x6B: return MODRM_I8;                             /* imul r, r/m, imm8 */
    case 0x80: case 0x81: case 0x83: return GROUP;          /* alu r/m, imm */
    case 0x8D: return GROUP;                                /* lea: memory operand only */
    case 0xA8: return I8;                                   /* test al, imm8 */
    case 0xA9: return IZ;                                   /* test eax, imm */
    case 0xC0: case 0xC1: return GROUP;                     /* shifts by imm8 */
    case 0xC3: case 0xC9: case 0xCC: return PLAIN;          /* ret, leave, int3 */
    case 0xC6: case 0xC7: return GROUP;                     /* mov r/m, imm (reg field 0 only) */
    case 0xE8: case 0xE9: case 0xEB: return BRANCH;         /* call/jmp rel */
    case 0xF6: case 0xF7: return GROUP;                     /* test/not/neg/mul/div */
    case 0xFE: case 0xFF: return GROUP;                     /* inc/dec/call/jmp/push */
    default: return UNKNOWN;
    }
}

/* Two-byte (0F xx) map, without mandatory-prefix (F2/F3) forms. */
static uint8_t two_byte_map(uint8_t op)
{
    if (op >= 0x40 && op <= 0x4F) return MODRM;             /* cmovcc */
    if (op >= 0x80 && op <= 0x8F) return BRANCH;            /* jcc rel32 */
    if (op >= 0x90 && op <= 0x9F) return MODRM;             /* setcc */
    if (op >= 0xC8 && op <= 0xCF) return PLAIN;             /* bswap */
    switch (op) {
    case 0x0B: return PLAIN;                                /* ud2 */
    case 0x1F: return MODRM;                                /* nop r/m */
    case 0x10: case 0x11: case 0x28: case 0x29: return MODRM; /* movups/movupd, movaps/movapd */
    case 0x57: return MODRM;                                /* xorps/xorpd */
    case 0xA3: case 0xAB: case 0xB3: case 0xBB: return MODRM; /* bt, bts, btr, btc */
    case 0xA4: case 0xAC: return MODRM_I8;                  /* shld/shrd imm8 */
    case 0xA5: case 0xAD: return MODRM;                     /* shld/shrd cl */
    case 0xAF: return MODRM;                                /* imul r, r/m */
    case 0xB0: case 0xB1: return UNKNOWN;                   /* cmpxchg: usually locked; leave it */
    case 0xB6: case 0xB7: case 0xBE: case 0xBF: return MODRM; /* movzx, movsx */
    default: return UNKNOWN;
    }
}

/*
 * Two-byte (0F xx) opcodes behind a mandatory or lock prefix that MSVC emits
 * often (SSE scalar and integer moves and arithmetic, lock xadd/cmpxchg),
 * each a ModRM form without an immediate unless the map says so. Only the
 * pairs listed here: the same opcode behind another prefix may be another
 * instruction, or none.
 */
static uint8_t prefixed_two_byte_map(uint8_t prefix, uint8_t op)
{
    switch (prefix) {
    case 0x66:
        switch (op) {
        case 0x14: case 0x2E: case 0x2F: case 0x54: case 0x58: case 0x59: case 0x5C: case 0x5E:
        case 0x62: case 0x6C: case 0x6E: case 0x6F: case 0x7E: case 0x7F:
        case 0xD4: case 0xD6: case 0xDB: case 0xEB: case 0xEF: case 0xFA: case 0xFB: case 0xFE:
            return MODRM;
        case 0x70: return MODRM_I8;                         /* pshufd */
        default: return UNKNOWN;
        }
    case 0xF2:
        switch (op) {
        case 0x10: case 0x11: case 0x2A: case 0x2C: case 0x2D: case 0x51: case 0x58: case 0x59:
        case 0x5A: case 0x5C: case 0x5D: case 0x5E: case 0x5F:
            return MODRM;                                   /* movsd, cvt*sd, sd arithmetic */
        default: return UNKNOWN;
        }
    case 0xF3:
        switch (op) {
        case 0x10: case 0x11: case 0x2A: case 0x2C: case 0x2D: case 0x51: case 0x58: case 0x59:
        case 0x5A: case 0x5C: case 0x5D: case 0x5E: case 0x5F: case 0x6F: case 0x7E: case 0x7F:
        case 0xE6: case 0xB8: case 0xBC: case 0xBD:
            return MODRM;                                   /* movss, ss arithmetic, movdqu, popcnt/tzcnt/lzcnt */
        default: return UNKNOWN;
        }
    case 0xF0:
        return op == 0xC1 || op == 0xB1 ? MODRM : UNKNOWN;  /* lock xadd, lock cmpxchg (memory only) */
    default:
        return UNKNOWN;
    }
}

/* ── ModRM ───────────────────────────────────────────────────────────── */

/*
 * Length of ModRM + SIB + displacement at p (p[0] is ModRM), or 0 when it
 * runs past avail. Sets *interesting for RIP-relative operands and for a SIB
 * index scaled by 4 (the indexed load of a switch table).
 */
static size_t modrm_length(const uint8_t *p, size_t avail, int *interesting)
{
    size_t length = 1;
    uint8_t modrm, mod, rm;
    if (avail < 1) return 0;
    modrm = p[0];
    mod = modrm >> 6;
    rm = modrm & 7;
    if (mod == 3) return 1;
    if (rm == 4) {
        uint8_t sib;
        if (avail < 2) return 0;
        sib = p[1];
        length = 2;
        if ((sib >> 6) == 2) *interesting |= HP_SCALE4;
        if (mod == 0 && (sib & 7) == 5) {
            length += 4;         /* [index*scale + disp32]: an absolute address */
            *interesting |= HP_ABSOLUTE;
        }
    } else if (mod == 0 && rm == 5) {
        *interesting |= HP_RIP;  /* [rip + disp32] */
        length += 4;
    }
    if (mod == 1) length += 1;
    else if (mod == 2) {
        length += 4;
        *interesting |= HP_DISP32; /* [reg + disp32]: an image-relative address in MSVC code */
    }
    return length <= avail ? length : 0;
}

/* ── the decoder ─────────────────────────────────────────────────────── */

/*
 * The bound a compare gives a switch: the immediate (imm_size bytes at the
 * instruction's end) of cmp reg, imm; -1 for the forms without one or with a
 * memory operand. A negative immediate stays unknown: capstone gives it
 * sign-extended or not depending on the operand size.
 */
static void compare_bound(const uint8_t *end, size_t imm_size, int register_operand, int *interesting,
                          int64_t *bound)
{
    const uint8_t *imm = end - imm_size;
    int64_t value = 0;
    size_t i;
    if (imm_size == 0 || !register_operand) {
        *bound = -1;
        *interesting |= HP_BOUND;
        return;
    }
    for (i = 0; i < imm_size; i++)
        value |= (int64_t)imm[i] << (8 * i);
    if (value >> (8 * imm_size - 1))
        return;
    *bound = value;
    *interesting |= HP_BOUND;
}

int hp_fast_length(const uint8_t *code, size_t avail, int *interesting)
{
    hp_fast_insn insn;
    int length = hp_fast_decode(code, avail, &insn);
    *interesting = insn.reasons;
    return length;
}

int hp_fast_decode(const uint8_t *code, size_t avail, hp_fast_insn *insn)
{
    size_t at = 0, length, immediate = 0;
    int opsize16 = 0, rex_w = 0, two_byte = 0;
    uint8_t op, shape, reg = 0, prefix = 0;
    int *interesting = &insn->reasons;

    insn->reasons = 0;
    insn->bound = 0;
    insn->modrm_offset = -1;
    insn->base_reg = -1;
    insn->rex = insn->opsize16 = insn->two_byte = insn->opcode = 0;
    if (avail == 0) return 0;
    if (code[at] == 0x66) {      /* one operand-size prefix, or one F2/F3/F0 before the few opcodes that take it */
        opsize16 = 1;
        at++;
        /* padding: 66 90 (xchg ax, ax) and 66 66 ... 0F 1F (multi-byte nop) */
        if (at < avail && code[at] == 0x90) return 2;
        if (at < avail && code[at] == 0x66) {
            while (at < avail && code[at] == 0x66 && at < 4) at++;
            if (at + 1 >= avail || code[at] != 0x0F || code[at + 1] != 0x1F) return 0;
        }
    } else if (code[at] == 0xF2 || code[at] == 0xF3 || code[at] == 0xF0) {
        prefix = code[at];
        at++;
    }
    if (at < avail && (code[at] & 0xF0) == 0x40) {
        rex_w = (code[at] & 0x08) != 0;
        insn->rex = code[at];
        at++;
    }
    if (at >= avail) return 0;
    op = code[at++];
    if (op == 0x0F) {
        if (at >= avail) return 0;
        two_byte = 1;
        op = code[at++];
        if (prefix)
            shape = prefixed_two_byte_map(prefix, op);
        else if ((shape = two_byte_map(op)) == UNKNOWN && opsize16)
            shape = prefixed_two_byte_map(0x66, op);
    } else if (prefix == 0xF0 && op == 0xFF) {
        shape = GROUP;           /* lock inc/dec: checked below */
    } else {
        shape = prefix ? UNKNOWN : one_byte_map(op);
    }
    if (shape == UNKNOWN) return 0;
    insn->opsize16 = (uint8_t)opsize16;
    insn->two_byte = (uint8_t)two_byte;
    insn->opcode = op;
    if (shape == BRANCH) {
        *interesting = HP_BRANCH;
        return 0;                /* the caller decodes it with details directly */
    }
    /* 66 only where it simply selects 16-bit operands (or the SSE pd forms) */
    if (op == 0x63 && !two_byte && !rex_w) return 0;   /* capstone knows movsxd only with REX.W */
    if (opsize16 && (shape == PLAIN || shape == I8 || op == 0x63 || op == 0x68 || op == 0xFF
                     || (two_byte && op >= 0x90 && op <= 0x9F)))
        return 0;

    /* a lock prefix is valid only on a memory operand */
    if (prefix == 0xF0 && (at >= avail || (code[at] >> 6) == 3)) return 0;
    if (shape == GROUP) {
        if (at >= avail) return 0;
        reg = (code[at] >> 3) & 7;
        if (prefix == 0xF0 && reg > 1) return 0;
        switch (op) {
        case 0x80: case 0x83: shape = MODRM_I8; break;
        case 0x81: shape = MODRM_IZ; break;
        case 0x8D: if ((code[at] >> 6) == 3) return 0; shape = MODRM; break;
        case 0xC0: case 0xC1: if (reg == 6) return 0; shape = MODRM_I8; break;
        case 0xD0: case 0xD1: case 0xD2: case 0xD3: if (reg == 6) return 0; shape = MODRM; break;
        case 0xC6: if (reg != 0) return 0; shape = MODRM_I8; break;
        case 0xC7: if (reg != 0) return 0; shape = MODRM_IZ; break;
        case 0xF6: if (reg == 1) return 0; shape = reg == 0 ? MODRM_I8 : MODRM; break;
        case 0xF7: if (reg == 1) return 0; shape = reg == 0 ? MODRM_IZ : MODRM; break;
        case 0xFE: if (reg > 1) return 0; shape = MODRM; break;
        case 0xFF:
            if (reg == 3 || reg == 5 || reg == 7) return 0;
            shape = MODRM;
            break;
        default: return 0;
        }
    }
    /* compares set the bounds of a switch: the analysis wants them decoded */
    if (!two_byte && ((op >= 0x38 && op <= 0x3D) || ((op == 0x80 || op == 0x81 || op == 0x83) && reg == 7)))
        *interesting = HP_COMPARE;

    switch (shape) {
    case PLAIN: length = at; break;
    case I8: immediate = 1; length = at + 1; break;
    case IZ: immediate = opsize16 && !rex_w ? 2 : 4; length = at + immediate; break;
    case IV: length = at + (rex_w ? 8 : (opsize16 ? 2 : 4)); break;
    case MODRM: case MODRM_I8: case MODRM_IZ: {
        size_t modrm = modrm_length(code + at, avail - at, interesting);
        if (modrm == 0) return 0;
        insn->modrm_offset = (int)at;
        if (*interesting & HP_DISP32)  /* mod 2: the base is ModRM.rm, or SIB.base behind rm 4 */
            insn->base_reg = (((code[at] & 7) == 4 ? code[at + 1] : code[at]) & 7) | ((insn->rex & 1) << 3);
        if (shape == MODRM_I8) immediate = 1;
        else if (shape == MODRM_IZ) immediate = opsize16 && !rex_w ? 2 : 4;
        length = at + modrm + immediate;
        break;
    }
    default: return 0;
    }
    if (length > avail || length > 15) return 0;
    if (*interesting & HP_COMPARE)  /* (38-3B have a ModRM and no immediate; 3C/3D none and al/eax) */
        compare_bound(code + length, immediate, shape == I8 || shape == IZ || (code[at] >> 6) == 3, interesting,
                      &insn->bound);
    return (int)length;
}
