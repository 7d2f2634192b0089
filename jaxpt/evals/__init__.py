"""Evaluations of trained models (automated, program-scored)."""

from jaxpt.evals.verifiable import verifiable_accuracy

__all__ = ["verifiable_accuracy"]
