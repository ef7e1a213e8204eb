"""Benchmark runner, device-tier profiles and emulation, statistics, result files."""
