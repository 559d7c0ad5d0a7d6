"""3D VQ-GAN trained on CT patches, whole volumes rebuilt by blended sliding windows (X-ray2CTPA stage 1)."""
