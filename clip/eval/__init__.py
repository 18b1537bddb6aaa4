"""Evaluation: zero-shot, retrieval and classification metrics, linear probe, generation."""
