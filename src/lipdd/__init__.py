"""lipdd: Lipschitz estimates of trained networks and double descent, as a tracked pipeline."""

__version__ = "0.1.0"
