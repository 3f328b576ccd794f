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
 * to 1 if the instruction may carry a reference that needs a full decode.
 */
int hp_fast_length(const uint8_t *code, size_t avail, int *interesting);

#endif
