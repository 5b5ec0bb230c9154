"""Evaluation: verification `.bin` protocol, baselines, dataset metrics."""
