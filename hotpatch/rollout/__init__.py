"""Fleet rollouts: health-gated waves of a package over many hosts, on Dask distributed.

Owns: the plan (plan.py), hosts and their maintenance windows in local time
(windows.py), the order in which targets go (planner.py), the targets' state
machine and its SQLite store with the orchestrator lock (state.py), the loop
both executors share (runner.py), the executors: Dask workers running the
host task (executor_dask.py, hostwork.py) and a simulation without processes
(executor_sim.py), the live view and the final report (view.py), and the
``hotpatch rollout`` command (cli.py). See docs/ROLLOUT.md.

May import: hotpatch.errors, hotpatch.package (loading and checking the
package), and hotpatch.apply (the same apply / status / rollback / health
gate code a single host runs, only inside hostwork.py). Nothing below
imports this package.
"""
