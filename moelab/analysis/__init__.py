"""Analysis: routing traces and load balance, expert placement and its simulator, memory model, recommender,
predictor. Pure numpy / pandas / scikit-learn on ModelSpecs and traces; no torch, no engine, runs on a CPU.

Modules: trace (RoutingTrace), synthetic (baselines), balance (metrics), placement / eplb / affinity /
strategies (Placement and how to build one), simulate (replay a trace under a placement), hardware (Cluster),
layout (parallel layouts), memory, throughput (analytic step and run time), recommend, predictor, figures.
Only the two data types the engine shares are re-exported here, so importing them stays cheap (numpy only).
"""

from moelab.analysis.placement import Placement
from moelab.analysis.trace import RoutingTrace

__all__ = ["Placement", "RoutingTrace"]
