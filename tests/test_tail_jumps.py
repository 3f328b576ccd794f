"""A conditional tail jump past fill and data is not more of the function it leaves.

OpenSSL's hand-written dispatchers (``aesni_cbc_sha256_enc``) have no .pdata and jump to a sibling's entry,
a Win64 prologue just before that sibling's .pdata range, past a constant table and the module's banner
string. Discovery's reachable-end rule once kept the jump's target inside the dispatcher, so the table and
the banner were decoded as its code (10 verdict reasons to nowhere in _rust.pyd 43.0.0 -> 43.0.1).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotpatch import Image, discover
from hotpatch.analysis import _discovery, functions
from hotpatch.analysis.api import AnalysisContext, backend, decode
from hotpatch.analysis.functions import Function, FunctionTable
from hotpatch.diff.compare import diff
from hotpatch.verdict.rules import decide
from tests.fixtures.build_fixtures import CC
from tests.support.realbins import real_binary

BANNER = b"CRYPTOGAMS by <appro@openssl.org>"

# dispatch: no .pdata, reached only through entry's call, its jne lands on sibling_entry, 13 bytes of
# prologue before sibling's .pdata range, past a table and the banner. loop_back: a leaf that jumps past
# padding and data to a block that comes back (its jmp 2b), which stays in.
SOURCE = r"""
long long dispatch(long long x);
long long loop_back(long long x);

__declspec(dllexport) long long entry(long long x) { return dispatch(x) + loop_back(x); }

__asm__(
    ".text\n"
    ".p2align 4\n"
    "dispatch:\n"
    "    lea table(%rip), %r11\n"
    "    mov $1, %eax\n"
    "    test %rcx, %rcx\n"
    "    je 1f\n"
    "    jne sibling_entry\n"
    "    ud2\n"
    "1:  rep ret\n"
    ".p2align 6\n"
    "table:\n"
    "    .long 0x428a2f98,0x71374491,0xb5c0fbcf,0xe9b5dba5,0x3956c25b,0x59f111f1,0x923f82a4,0xab1c5ed5\n"
    "    .long 0xd807aa98,0x12835b01,0x243185be,0x550c7dc3,0x72be5d74,0x80deb1fe,0x9bdc06a7,0xc19bf174\n"
    "    .long 0x00010203,0x04050607,0x08090a0b,0x0c0d0e0f,0,0,0,0,-1,-1,-1,-1,0,0,0,0\n"
    "    .asciz \"AESNI-CBC+SHA256 stitch for x86_64, CRYPTOGAMS by <appro@openssl.org>\"\n"
    ".p2align 4\n"
    "sibling_entry:\n"
    "    mov %rdi, 8(%rsp)\n"
    "    mov %rsi, 16(%rsp)\n"
    "    mov %rsp, %rax\n"
    ".seh_proc sibling\n"
    "sibling:\n"
    "    push %rbx\n"
    "    .seh_pushreg %rbx\n"
    "    .seh_endprologue\n"
    "    lea 3(%rcx,%rcx), %rax\n"
    "    pop %rbx\n"
    "    ret\n"
    ".seh_endproc\n"
    ".p2align 4\n"
    "loop_back:\n"
    "    xor %eax, %eax\n"
    "2:  test %rcx, %rcx\n"
    "    jne 3f\n"
    "    ret\n"
    ".p2align 4\n"
    "    .long 0x6a09e667,0xbb67ae85,0x3c6ef372\n"
    ".p2align 4\n"
    "3:  add %rcx, %rax\n"
    "    dec %rcx\n"
    "    jmp 2b\n"
);
"""


@pytest.fixture(scope="module")
def dispatcher_dll(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The DLL, stripped like a release build: nothing names dispatch or sibling_entry."""
    out = tmp_path_factory.mktemp("tail_jumps")
    (out / "tail.c").write_text(SOURCE)
    subprocess.run([CC, "-O2", "-shared", "-s", "tail.c", "-o", "tail.dll"], cwd=out, check=True)
    return out / "tail.dll"


@pytest.fixture
def without_tail_gaps(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Discovery with the reachable-end rule as it was: every branch target below the next start kept."""
    rule, batched = _discovery.reachable_end, _discovery.reach_windows
    monkeypatch.setattr(_discovery, "reachable_end", lambda *args: rule(*args[:7], False))
    monkeypatch.setattr(_discovery, "reach_windows", lambda *args: batched(*args[:7], False))
    yield


def _layout(table: FunctionTable) -> tuple[int, Function, int]:
    """The banner's RVA, the function before it and the start of sibling's .pdata range after it."""
    memory = table.image.memory
    banner = memory.find(BANNER)
    assert banner > 0
    sibling = min(f.begin_rva for f in table.image.runtime_functions if f.begin_rva > banner)
    dispatcher = table.preceding(banner)
    assert dispatcher is not None
    return banner, dispatcher, sibling


def test_the_banner_is_in_no_function_and_the_dispatcher_ends_at_its_ret(dispatcher_dll: Path) -> None:
    table = discover(Image.load(dispatcher_dll))
    banner, dispatcher, sibling = _layout(table)
    assert table.containing(banner) is None
    assert table.image.memory[dispatcher.end_rva - 2:dispatcher.end_rva] == b"\xf3\xc3"  # rep ret
    assert dispatcher.unwind is None and dispatcher.sources == ("call",)
    # the jne's target is the sibling's entry, a function of its own that runs into the .pdata range
    entry = table.at(sibling - 13)
    assert entry is not None and entry.end_rva == sibling
    assert table.overlaps() == []


def test_the_old_rule_swept_the_banner_into_the_dispatcher(dispatcher_dll: Path, without_tail_gaps: None) -> None:
    """The DLL reproduces the pattern: without the tail-gap rule the dispatcher runs to the sibling."""
    table = discover(Image.load(dispatcher_dll))
    banner, dispatcher, sibling = _layout(table)
    assert table.containing(banner) == dispatcher and dispatcher.end_rva == sibling


def test_code_past_padding_and_data_that_branches_back_stays_in(dispatcher_dll: Path) -> None:
    table = discover(Image.load(dispatcher_dll))
    memory = table.image.memory
    words = memory.find(bytes.fromhex("67e6096a85ae67bb72f36e3c"))
    loop_back = table.preceding(words)
    assert loop_back is not None and loop_back.unwind is None
    # its last instruction is the jmp back (eb xx), after the data: one function, as without the rule
    assert loop_back.rva < words < loop_back.end_rva and memory[loop_back.end_rva - 2] == 0xEB
    assert table.containing(words + 16) == loop_back


def test_self_diff_is_zero(dispatcher_dll: Path) -> None:
    result = diff(dispatcher_dll, dispatcher_dll)
    assert result.summary()["changed"] == 0 and decide(result).status == "HOTPATCH"


@pytest.mark.parametrize("window", [16, 36, 48, 2048])
def test_a_first_window_bounds_as_the_whole_decode_does(dispatcher_dll: Path, window: int,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A tail gap is confirmed only after it: a window that ends before the confirmation decides nothing
    (36 bytes of loop_back end between its block past the data and the jmp back that keeps that block)."""
    image = Image.load(dispatcher_dll)
    # the starts known when the dispatcher is first bounded: the sibling's entry is found later, in a gap
    starts = sorted(f.rva for f in discover(image) if f.sources != ("gap",))
    items = []
    for rva, following in zip(starts, starts[1:] + [0]):
        section = image.code_section(rva)
        assert section is not None
        limit = following if rva < following <= section.end_rva else section.end_rva
        items.append((rva, ((rva, limit),)))
    monkeypatch.setattr(functions, "_REACH_WINDOW", window)
    ctx, core = AnalysisContext.from_image(image), backend()
    analyses = decode(ctx, items, core)
    whole = [functions._reachable(image.memory, item, analysis) for item, analysis in zip(items, analyses)]
    assert functions._reach(ctx, core, image.memory, items, [0] * len(items), {}) == whole
    # the comparison met the dispatcher, cut at its rep ret by the rule
    assert sum(functions._reachable(image.memory, item, analysis, tail_gaps=False) != cut
               for item, analysis, cut in zip(items, analyses, whole)) == 1


# ── the real case ─────────────────────────────────────────────────────────────────────────────────────


RUST = "cryptography/hazmat/bindings/_rust.pyd"


@pytest.mark.realbins
def test_no_openssl_banner_is_decoded_as_code_in_rust_pyd() -> None:
    """Every CRYPTOGAMS banner of _rust.pyd 43.0.1 lies outside every function (0x24de54 was inside
    sub_24db40, which ran to aesni_cbc_sha256_enc_xop's .pdata start), and its diff from 43.0.0 has no
    reason naming that dispatcher (10 before: 5 references outside the image, 5 rel8 branches)."""
    baseline, patched = real_binary("cryptography", "43.0.0", RUST), real_binary("cryptography", "43.0.1", RUST)
    table = discover(Image.load(patched))
    memory = table.image.memory
    banners = []
    at = memory.find(BANNER)
    while at >= 0:
        if table.image.code_section(at) is not None:
            banners.append(at)
        at = memory.find(BANNER, at + 1)
    assert len(banners) >= 10
    assert [hex(b) for b in banners if table.containing(b) is not None] == []
    dispatcher = table.at(0x24DB40)
    assert dispatcher is not None and dispatcher.end_rva == 0x24DBA7  # after its rep ret
    assert table.at(0x24DE80) is not None  # the jne's target: the sibling's entry
    reasons = decide(diff(baseline, patched)).reasons
    assert [r for r in reasons if r.subject == dispatcher.label] == []
    assert not any("outside the image" in r.message and r.subject.startswith("sub_24d") for r in reasons)
