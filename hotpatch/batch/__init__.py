"""Batch runs: many diff, build and verify jobs over pairs of images, locally or on a Dask cluster.

Owns the manifest (``manifest``), running one job (``jobs``) in a job process
(``child``, ``process``), the local pool and the Dask engine (``runner``,
``cluster``), the results file (``store``) and the summary (``summary``), and the
``hotpatch batch`` command (``cli``). It sits on top of the pipeline and calls
the stages only through their public functions (image, functions, diff,
package, verify); nothing below imports it. ``hotpatch.report`` reads its
records and summaries.
"""

from __future__ import annotations

from .jobs import CacheSpec, MemoryCache, TableCache, run_job
from .manifest import KINDS, Job, load_manifest, pair_folders, release_jobs
from .runner import BatchResult, run_batch
from .store import read_results
from .summary import summarize

__all__ = ["KINDS", "BatchResult", "CacheSpec", "Job", "MemoryCache", "TableCache", "load_manifest",
           "pair_folders", "read_results", "release_jobs", "run_batch", "run_job", "summarize"]
