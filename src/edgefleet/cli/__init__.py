"""The ``edgefleet`` command: one module per command group, no logic beyond arguments and printing."""
