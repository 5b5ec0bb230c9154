"""Models: networks ported to Flax NNX (MTCNN's O-Net for five-point landmarks, ...)."""
