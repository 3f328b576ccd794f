"""Verifying a package in the emulator: baseline + package must compute what the patched image computes.

The baseline is mapped in Unicorn at a base other than its preferred one,
the package goes in through the same transaction engine a live apply uses,
then the same calls run on it and on the patched image (mapped the same way),
and their results, buffer arguments and the data they changed are compared.
Without an inputs file, every export whose code the package changes (itself
or through what it calls) is called with a default set of integer arguments.

A DLL rarely runs alone: the DLLs of the same program it imports (found
beside the baseline, ``sibling_dlls``) and any named as companions (a DLL
that drives it, say) are mapped in both processes, the baseline's own copies
in both, so that only the package makes the two differ.
"""

from __future__ import annotations

import tempfile
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .apply.emulator import EmulatorBackend
from .apply.engine import Engine
from .apply.journal import Journal
from .calls import CallResult, CallSpec, Difference, compare, default_calls, run_calls
from .dataitems import DataItems
from .diff import DiffResult, diff
from .errors import HotpatchError, VerifyError
from .functions import FunctionTable
from .image import Image
from .matching import call_graph
from .package.builder import build_package
from .package.model import ImportTarget, Package
from .targets import TargetClassifier

__all__ = ["VerifyReport", "affected_exports", "sibling_dlls", "verify"]


@dataclass(frozen=True)
class VerifyReport:
    package_id: str
    baseline_base: int
    patched_base: int
    calls: tuple[CallSpec, ...]
    patched_results: tuple[CallResult, ...]
    expected_results: tuple[CallResult, ...]
    difference: Difference | None
    modules: tuple[str, ...] = ()  # the images mapped in each process, in load order

    @property
    def agrees(self) -> bool:
        return self.difference is None

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": "hotpatch.verify/1",
            "package_id": self.package_id,
            "agrees": self.agrees,
            "baseline_base": self.baseline_base,
            "patched_base": self.patched_base,
            "modules": list(self.modules),
            "calls": [
                {"call": str(spec), "baseline_with_package": a.value, "patched": b.value}
                for spec, a, b in zip(self.calls, self.patched_results, self.expected_results)
            ],
            "first_difference": None if self.difference is None else
            {"call": self.difference.index, "kind": self.difference.kind, "message": self.difference.message},
        }


def affected_exports(baseline: FunctionTable, changed: set[int]) -> list[str]:
    """Exports of the baseline at ``changed`` RVAs, or that reach them through their callees."""
    callees, _ = call_graph(baseline)
    callers: dict[int, set[int]] = defaultdict(set)
    for caller, targets in callees.items():
        for target in targets:
            callers[target].add(caller)
    reached = set(changed)
    frontier = list(changed)
    while frontier:
        for caller in callers.get(frontier.pop(), ()):
            if caller not in reached:
                reached.add(caller)
                frontier.append(caller)
    return sorted({e.name for e in baseline.image.exports if e.name and e.rva in reached})


def sibling_dlls(image: Image) -> list[Path]:
    """The DLLs beside ``image`` on disk that it imports, directly or through each other (file names, case aside)."""
    if not image.path:
        return []
    directory = Path(image.path).parent
    on_disk = {p.name.lower(): p for p in directory.iterdir() if p.suffix.lower() == ".dll" and p.is_file()}
    found: dict[str, Path] = {}
    pending = [image]
    own = Path(image.path).name.lower()
    while pending:
        for entry in pending.pop().imports:
            key = entry.dll.lower()
            if key in on_disk and key != own and key not in found:
                found[key] = on_disk[key]
                pending.append(Image.load(on_disk[key]))
    return sorted(found.values())


def verify(package: Package, baseline: str | Path, patched: str | Path,
           calls: list[CallSpec] | None = None, companions: Sequence[str | Path] = ()) -> VerifyReport:
    """Apply ``package`` to ``baseline`` in the emulator and make ``calls`` there and on ``patched``.

    Both processes also map ``companions`` and the baseline's ``sibling_dlls``
    (see the module docstring); the patched image then takes the baseline's
    file name, so DLLs that import the baseline bind to it.
    """
    baseline_image, patched_image = Image.load(baseline), Image.load(patched)
    result = diff(baseline_image, patched_image, allow_layout_change=True)
    if calls is None:
        names = affected_exports(result.baseline, {site.rva for site in package.sites})
        if not names:
            raise VerifyError("the package changes no exported code; give the calls to make with --inputs")
        calls = default_calls(names)
    others = [*companions, *sibling_dlls(baseline_image)]
    if others:
        name = Path(baseline).name
        live = EmulatorBackend.load_process(baseline_image, others, name=name)
        reference = EmulatorBackend.load_process(patched_image, others, name=name)
    else:
        live = EmulatorBackend.load(baseline_image)
        reference = EmulatorBackend.load(patched_image)
    try:
        live.provide_imports(sorted({(f.target.dll, f.target.name) for f in package.fixups
                                     if isinstance(f.target, ImportTarget)}))
        with tempfile.TemporaryDirectory(prefix="hotpatch-verify-") as state:
            # verify checks behaviour in an emulator, not provenance: whoever signed it is accepted here
            signer = [package.signer_public_key] if package.signer_public_key else []
            engine = Engine(live, Journal(Path(state)), allow_unsigned=True, trusted_keys=signer)
            with engine.transaction() as tx:
                applied = tx.apply(package)
        with_package = run_calls(live, calls)
        expected = run_calls(reference, calls)
        translate, domain = _translator(result, package, applied, live, reference)
        difference = compare(with_package, expected, labels=("baseline + package", "patched"),
                             translate=translate, translate_first=domain)
        return VerifyReport(package.package_id, live.main_module().base_va, reference.main_module().base_va,
                            tuple(calls), tuple(with_package), tuple(expected), difference,
                            tuple(m.name for m in live.images()))
    finally:
        live.close()
        reference.close()


def _translator(result: DiffResult, package: Package, applied: Any, live: EmulatorBackend,
                reference: EmulatorBackend) -> tuple[Any, Any]:
    """Patched-process address -> where the same datum lives in the baseline + package process.

    Existing data maps item by item through the diff's data map. New data
    lives in the package's blobs: rebuilding the package from the same diff
    says which patched RVA each blob came from (only when the rebuild is the
    same package; otherwise new data is left out of the comparison). The
    second function keeps, of the baseline + package process, only the
    addresses something maps to: data neither side shares is not compared.
    """
    live_base = live.main_module().base_va
    patched_module = reference.main_module()
    items_a, items_b = _items(result.baseline), _items(result.patched)
    spans: list[tuple[int, int, int]] = []  # (patched start, size, baseline-process VA)
    for rva_a, rva_b in result.data_map.items():
        size = min(items_a.extent(rva_a), items_b.extent(rva_b))
        if size > 0:
            spans.append((rva_b, size, live_base + rva_a))
    origins: dict[int, int] = {}
    try:
        rebuilt = build_package(result, sequence=package.sequence, baseline_id=package.baseline_id,
                                description=package.metadata.description, cve_ids=package.metadata.cve_ids,
                                created=package.metadata.created, origins=origins)
        if rebuilt.content_sha256 != package.content_sha256:
            origins = {}
    except HotpatchError:
        origins = {}
    blob_vas: dict[int, int] = dict(applied.blob_vas)
    spans += [(rva, package.blobs[blob].size, blob_vas[blob]) for blob, rva in origins.items() if blob in blob_vas]
    spans.sort()
    starts = [span[0] for span in spans]
    targets = sorted((va, va + size) for _, size, va in spans)

    def translate(va: int) -> int | None:
        if not patched_module.contains(va):
            return None
        rva = va - patched_module.base_va
        index = bisect_right(starts, rva) - 1
        if index >= 0 and rva < spans[index][0] + spans[index][1]:
            return spans[index][2] + rva - spans[index][0]
        return None

    def domain(va: int) -> int | None:
        index = bisect_right(targets, (va, 1 << 64)) - 1
        return va if index >= 0 and va < targets[index][1] else None

    return translate, domain


def _items(table: FunctionTable) -> DataItems:
    targets = TargetClassifier(table)
    referenced = {ref[4] for analysis in table.analyses for ref in analysis.raw_refs if targets.is_data(ref[4])}
    return DataItems(table, targets, referenced)
