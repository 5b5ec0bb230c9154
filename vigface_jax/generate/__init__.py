"""Stage 3's generation: drawing faces from class-centre rows (real or virtual) with the DiT."""
