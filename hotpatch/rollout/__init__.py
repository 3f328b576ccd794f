"""Fleet rollouts: health-gated waves of a package over many hosts, on Dask distributed.

Owns: the plan (plan.py), hosts and their maintenance windows in local time
(windows.py), the order in which targets go (planner.py), the targets' state
machine and its SQLite store with the orchestrator lock (state.py), the loop
both executors share (runner.py), the executors: Dask workers running the
host task (executor_dask.py, hostwork.py) and a simulation without processes
(executor_sim.py), wiring a rollout together (orchestrator.py), the live view
and the final report (view.py), the ``hotpatch rollout`` command (cli.py) and
``make demo-rollout`` (demo.py). See docs/ROLLOUT.md.

May import: hotpatch.errors, hotpatch.package (loading and checking the
package), hotpatch.apply (the health spec and its parsers in plan.py; the
agent, engine, journal and health gate only in hostwork.py, which runs on
the hosts), hotpatch.process.winehost (the demo). Nothing below imports this package.
"""
