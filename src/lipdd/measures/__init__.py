"""What `lipdd stats` measures: the registry of measures (registry) and of probe sets (probes), and
the numerical methods behind them: input Jacobians (jacobian), the Lipschitz upper bound
(lipschitz), the loss Hessian (curvature) and Lanczos iteration (lanczos)."""

from .probes import PROBES, Points, ProbeSet
from .registry import MEASURES, Batch, Measure, Network, per_sample

__all__ = ["MEASURES", "PROBES", "Batch", "Measure", "Network", "Points", "ProbeSet", "per_sample"]
