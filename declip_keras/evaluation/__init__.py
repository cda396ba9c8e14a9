"""Evaluation: zero-shot classification, retrieval, the linear probe, and the
sources they read (class names, templates, ImageFolder, Karpathy splits)."""
