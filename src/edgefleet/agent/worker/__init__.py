"""Everything that runs inside the inference worker process (docs/adr/0106-agent-worker-process-boundary.md).

The worker runs a model that may be hostile, apart from the agent that holds the device's keys: nothing here
imports the agent's side (its supervisor, service, updater, state, identity); it may import only the shared wire
modules both sides speak (``agent/frames.py``, ``agent/codec.py``, ``agent/httpserver.py``, ``agent/oip.py``,
``agent/serving.py``, ``agent/shm.py``, ``agent/feedback.py``). The ``agent-worker`` contract in pyproject.toml
holds it.

* ``main.py``: the process's entry (``python -P agent/worker/main.py``), the frame loop, the lean bare-ONNX path;
* ``packaged.py``: the full path, for packages: :func:`~edgefleet.agent.worker.packaged.load`,
  :func:`~edgefleet.agent.worker.packaged.golden`;
* ``httpserve.py``: the worker serving the OIP port itself (ADR 0032), over its ``WorkerService``;
* ``spec.py``: what a worker loads and what it reports (:class:`WorkerSpec`, :class:`ModelInfo`), both sides';
* ``driftcount.py``, ``sampler.py``: drift histograms and input sampling, counted where the inputs are.

Deliberately empty: the lean worker imports this package before its modules, so it must cost nothing.
"""
