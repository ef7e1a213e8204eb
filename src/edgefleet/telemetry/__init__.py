"""Telemetry shared by agent and control plane: latency sketches, counters, drift statistics."""
