"""offseg_jax: efficient semantic segmentation (OffSeg, FRM, ECENet) in JAX/Flax."""

__version__ = "0.1.0"
