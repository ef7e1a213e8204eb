"""What each compute node of the float model costs: its kernel time in onnxruntime's profile, per node name.

The fallback uses it to quantize the nodes that hold the time first. On PP-OCRv4's text recognizer 6 of its 38
convolutions hold 43 % of the convolution time; quantizing those (plus dynamic MatMul) stayed within a 0.01 CTC
drop at a measured 0.87 latency ratio, where keeping single noisy nodes in float never did (measured).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

__all__ = ["heaviest_first", "node_costs"]

log = logging.getLogger(__name__)

_SUFFIX = "_kernel_time"


def node_costs(
    model_bytes: bytes, feed: dict[str, np.ndarray], *, threads: int = 1, runs: int = 20, budget_s: float = 2.0
) -> dict[str, float]:
    """Median kernel time (µs) per node name over up to ``runs`` calls of ``feed`` (at most ``budget_s`` seconds).

    The session uses basic graph optimization only: fusions (Conv + activation, MatMul + Add) and the NCHWc layout
    rename nodes, and the profile must name the float model's nodes as ``nodes_to_exclude`` does. Empty when
    profiling fails: a ranking aid, never a reason to stop."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(threads, 1)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="edgefleet-prof-") as tmp:
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "profile")
        try:
            session = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
            session.run(None, feed)  # warm-up, in the profile too: dropped below by counting runs from the second
            t0, n = time.perf_counter(), 0
            while n < runs and (n == 0 or time.perf_counter() - t0 < budget_s):
                session.run(None, feed)
                n += 1
            events = json.loads(Path(session.end_profiling()).read_text())
        except Exception as err:  # onnxruntime raises anything; the ranking falls back to other orders
            log.debug("profiling failed: %s", err)
            return {}
    times: dict[str, list[float]] = defaultdict(list)
    for e in events:
        name = e.get("name", "")
        if e.get("cat") == "Node" and name.endswith(_SUFFIX):
            times[name[: -len(_SUFFIX)]].append(float(e.get("dur", 0)))
    # the first occurrence is the warm-up call; the median, as other jobs on the machine inflate a mean (two
    # mean-ranked profiles of one model under load disagreed on its heaviest node)
    return {k: float(np.median(v[1:])) for k, v in times.items() if len(v) > 1}


def heaviest_first(nodes: list[str], costs: dict[str, float], shares: tuple[float, ...]) -> list[list[str]]:
    """For each share (descending), the fewest heaviest ``nodes`` whose cost covers that share of theirs, heaviest
    first; nodes without a cost come last and count 0. Duplicates and the empty set are dropped; so is the set of
    every node (that is the candidate the search starts from)."""
    ranked = sorted(nodes, key=lambda n: (-costs.get(n, 0.0), nodes.index(n)))
    total = sum(costs.get(n, 0.0) for n in nodes)
    if total <= 0:
        return []
    cum = np.cumsum([costs.get(n, 0.0) for n in ranked])
    out: list[list[str]] = []
    for share in sorted(shares, reverse=True):
        k = int(np.searchsorted(cum, share * total - 1e-9)) + 1
        k = min(k, len(ranked))
        if 0 < k < len(ranked) and (not out or len(out[-1]) != k):
            out.append(ranked[:k])
    return out
