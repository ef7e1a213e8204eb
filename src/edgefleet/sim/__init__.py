"""Fleet simulator (``edgefleet simulate``) and the end-to-end demo (``edgefleet demo``): many real agents —
full ones as processes, lightweight ones sharing a process and a model — against a real control plane, with
device tiers and injected faults."""

from edgefleet.sim.fleet import Fleet, FleetOptions
from edgefleet.sim.server import ServerProcess
from edgefleet.sim.spec import DevicePlan, Fault, parse_duration, parse_faults, parse_tiers, plan_fleet

__all__ = [
    "DevicePlan",
    "Fault",
    "Fleet",
    "FleetOptions",
    "ServerProcess",
    "parse_duration",
    "parse_faults",
    "parse_tiers",
    "plan_fleet",
]
