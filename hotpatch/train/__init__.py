"""The release train: a servicing program of baselines and cumulative hotpatches over many releases.

Owns the train manifest (``manifest``), the policy of planned and unplanned
baselines (``plan``), running a train with resume (``run``), its figures
(``figures``), the calendar picture (``calendar``), the atomic output files
(``files``) and the ``hotpatch train`` command (``cli``). The analysis cache
it runs on is ``hotpatch.cache`` (shared with batch runs).

May import: the stages below it through their public functions
(``hotpatch.pe.image``, ``hotpatch.analysis.functions``, ``hotpatch.diff.compare``,
``hotpatch.package``), ``hotpatch.cache`` and ``hotpatch.errors``; never
``hotpatch.apply`` (a train builds packages, it does not touch processes).

    from hotpatch.train import load_manifest, run_train
    result = run_train(load_manifest("train.toml"), "out/")
    result.figures["restarts"], [r.kind for r in result.releases]
"""

from __future__ import annotations

from .manifest import Manifest, Policy, Release, load_manifest
from .outcome import ModuleOutcome, ReleaseOutcome, TrainResult
from .run import run_train

__all__ = ["Manifest", "ModuleOutcome", "Policy", "Release", "ReleaseOutcome", "TrainResult", "load_manifest",
           "run_train"]
