"""Accuracy- and latency-aware model optimization that never ships a worse model than the one it was given.

``optimize(model, calib, eval, out, ...)`` prepares the float model, builds a candidate per recipe (the prepared
float model, FP16, dynamic and static INT8 in their variants), scores each on the eval calls (task metric overall
and per slice, fidelity to the input model), times each against the input model as given in a paired A/B, keeps
sensitive nodes in float when a candidate breaks accuracy, and writes the fastest candidate that is within
tolerance and faster — else the input, byte for byte.
"""

from edgefleet.optimize.api import CompareLatency, host_tier, optimize, paired_ab
from edgefleet.optimize.candidates import Recipe, prune, recipe_space
from edgefleet.optimize.evaluate import Fidelity, Metric, MetricValues
from edgefleet.optimize.report import CandidateReport, LatencyResult, OpCoverage, OptimizeReport

__all__ = [
    "CandidateReport",
    "CompareLatency",
    "Fidelity",
    "LatencyResult",
    "Metric",
    "MetricValues",
    "OpCoverage",
    "OptimizeReport",
    "Recipe",
    "host_tier",
    "optimize",
    "paired_ab",
    "prune",
    "recipe_space",
]
