"""Accuracy- and latency-aware model optimization that never ships a worse model.

``optimize(model, calib, eval, out, ...)`` prepares the float model, builds a candidate per recipe (FP16, dynamic
and static INT8 in their variants), scores each on the eval calls (task metric overall and per slice, fidelity to
float), times each against the graph-optimized float model in a paired A/B, keeps sensitive nodes in float when a
candidate breaks accuracy, and writes the fastest candidate that is within tolerance and faster — else float.
"""

from edgefleet.optimize.api import host_tier, optimize
from edgefleet.optimize.candidates import Recipe, prune, recipe_space
from edgefleet.optimize.evaluate import Fidelity, Metric, MetricValues
from edgefleet.optimize.report import CandidateReport, LatencyResult, OpCoverage, OptimizeReport

__all__ = [
    "CandidateReport",
    "Fidelity",
    "LatencyResult",
    "Metric",
    "MetricValues",
    "OpCoverage",
    "OptimizeReport",
    "Recipe",
    "host_tier",
    "optimize",
    "prune",
    "recipe_space",
]
