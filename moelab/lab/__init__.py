"""The lab: calibration, benchmarks, sweeps, telemetry, profiles, factorial studies and reports.

It measures the engine only through its public API (moelab.llm, moelab.engine's public classes, moelab.roofline)
and keeps every number in a ResultsStore (moelab.lab.store). Heavy modules import lazily: importing
moelab.lab costs nothing.
"""

from moelab.lab.store import ResultsStore, point_key

__all__ = ["ResultsStore", "point_key"]
