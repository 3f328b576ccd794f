/*
 * x86_fastlen: instruction lengths of the most common x86-64 encodings.
 *
 * The analysis core decodes every instruction of every function. Capstone's
 * full decode (with operand text) costs about half a microsecond each; most
 * instructions (register moves, stack traffic, arithmetic) carry nothing the
 * analysis needs beyond their length. This decoder recognises a deliberately
 * small set of encodings whose validity is unambiguous and says whether an
 * instruction might carry a reference (relative branch, RIP-relative operand,
 * compare, 32-bit displacement, scaled-by-4 index). Anything it does not recognise, it leaves to
 * capstone. The tests check that analysis with and without it is identical.
 */
#ifndef HOTPATCH_X86_FASTLEN_H
#define HOTPATCH_X86_FASTLEN_H

#include <stddef.h>
#include <stdint.h>

/*
 * Length (1..15) of the instruction at code[0..avail), or 0 when the encoding
 * is outside the known set. When the length is non-zero, *interesting is set
 * to the HP_* reasons (non-zero) if the instruction may carry a reference that needs a full decode.
 */
int hp_fast_length(const uint8_t *code, size_t avail, int *interesting);

/*
 * Why an instruction is interesting (the bits of *interesting): the analysis
 * skips capstone's details where its own state shows a reason cannot matter
 * (a [reg + disp32] operand when no register holds the image base).
 */
enum {
    HP_BRANCH = 1,    /* relative branch (length 0: capstone sizes it) */
    HP_RIP = 2,       /* [rip + disp32] operand */
    HP_DISP32 = 4,    /* [base register (+ index) + disp32] operand */
    HP_ABSOLUTE = 8,  /* [index * scale + disp32] or [disp32]: no base register */
    HP_SCALE4 = 16,   /* SIB index scaled by 4 */
    HP_COMPARE = 32,  /* cmp: sets a switch's bound */
    HP_BOUND = 64     /* with HP_COMPARE: *bound is what the analysis takes from it (capstone's
                         immediate of cmp reg, imm; -1 for every other form) */
};

/* What hp_fast_decode tells about an instruction beyond its length. */
typedef struct {
    int reasons;          /* HP_* bits */
    int64_t bound;        /* with HP_BOUND */
    int modrm_offset;     /* offset of the ModRM byte, -1 without one */
    int base_reg;         /* with HP_DISP32: the base register's number (0-15, REX.B included), else -1 */
    uint8_t rex;          /* the REX prefix, 0 without one */
    uint8_t opsize16;     /* a 66 prefix */
    uint8_t two_byte;     /* 0F opcode map */
    uint8_t opcode;       /* the opcode byte (after 0F in that map) */
} hp_fast_insn;

/*
 * hp_fast_length with what the analysis can take from the bytes: the
 * compare's bound (an immediate negative at its encoded width is left to
 * capstone, whose value for it depends on the operand size), and where the
 * ModRM byte is, for RIP-relative operands.
 */
int hp_fast_decode(const uint8_t *code, size_t avail, hp_fast_insn *insn);

#endif
