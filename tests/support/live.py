"""The body_change host the live-apply tests share: the calls its threads make, their baseline values,
waiting until the host sees given values, and a module's mapped image."""

from __future__ import annotations

from hotpatch.apply.agent import AgentProcessBackend
from hotpatch.apply.backend import Module
from tests.support.hosts import Host

#: what host.exe's threads call on body_change/baseline.dll, and what the baseline returns
CALLS = ["scale:7", "add:2,3", "scale_then_xor:10,1"]
BASELINE = {"scale": 22, "add": 5, "scale_then_xor": 30}


def wait_values(host: Host, values: dict[str, int], start: int | None = None) -> None:
    """Until an observation interval after ``start`` (default: now) saw only each named value."""
    mark = host.mark() if start is None else start
    for name, value in values.items():
        host.wait_for_only(value, mark, name)


def image_of(target: AgentProcessBackend, module: Module) -> bytes:
    return target.read(module.base_va, module.size)
