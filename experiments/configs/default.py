r"""The default experiment: a small OffSeg-family model on the synthetic dataset.

Trains on 2 CPU cores in a few minutes with no download and reaches >= 0.80 val
mIoU (the per-pixel colour baseline, ``pixel_linear``, stays below 0.5).

  python -m offseg_jax.main --config=experiments/configs/default.py \
      --workdir=/tmp/offseg_default

Arguments after ':' pick a model, e.g. ``default.py:tiny`` for the small conv
test model.
"""

from experiments.configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.seed = 0
  c.batch_size = 8
  c.total_steps = 2000
  c.eval_every = 500
  c.checkpoint_every = 500
  c.log_every = 100

  c.model = common.model_config(arg or "offseg_nano")

  c.data = common.data_config("synthetic", image_size=64, num_train=8192, num_val=256,
                              crop_size=(64, 64))

  # Trained from scratch: one learning rate for backbone and head (the official
  # head x10 is for a fresh head on an ImageNet backbone; here it made training
  # unstable: 68 % instead of 84 % mIoU at the same budget) and clipped gradients.
  c.optimizer.lr = 2e-3
  c.optimizer.custom_keys.head.lr_mult = 1.0
  c.optimizer.grad_clip_norm = 1.0
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 0.01

  c.eval.mode = "whole"
  c.eval.crop_size = (64, 64)
  c.eval.stride = (64, 64)
  c.eval.batch_size = 32
  return c
