"""Training: the shared sharded trainer (state, optim, checkpoint, loop) and the trainers."""
