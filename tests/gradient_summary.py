"""Shared by the distribution workers (run as scripts from this folder)."""

import numpy as np


def summarize(variables, grads) -> dict[str, list[float]]:
    """Each gradient as its norm and a fixed random projection, which changes
    if any direction of the gradient changes."""
    summary = {}
    for index, (variable, grad) in enumerate(zip(variables, grads, strict=True)):
        grad = np.asarray(grad, np.float64)
        probe = np.random.default_rng(index).standard_normal(grad.shape)
        summary[variable.path] = [
            float(np.linalg.norm(grad)),
            float(np.sum(grad * probe)),
        ]
    return summary
