"""Data: grain sources (procedural faces, ...), landmarks, verification pairs, pipelines."""
