"""``python -m edgefleet.agent._worker_main``: the worker process's entry point (a module of its own, so the
worker's classes are pickled under their real module name, not ``__main__``)."""

from edgefleet.agent.worker import main

main()
