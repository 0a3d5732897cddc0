"""The official OffSeg-repo training recipe, shared by the per-family configs.

``offseg.py``, ``segformer_ol.py`` and ``segnext_ol.py`` each list the
variant x dataset combinations that HVision-NKU/OffSeg ships a config for
(``local_configs/``) with their iterations, batch and validation interval; this
module parses their ``'VARIANT,DATASET'`` argument and assembles the config.

What every official config shares (spec ``offseg.md`` §4.1-4.6), all of it
already ``common.base_config()``'s defaults: AdamW lr 6e-5, betas (0.9, 0.999),
weight decay 0.01, custom keys ``pos_block``/``norm`` (no decay) and ``head``
(lr x10), no gradient clipping, LinearLR warm-up over 1500 steps from 1e-6 then
PolyLR (power 1, to 0) ending at ``total_steps``. Per dataset: the crop, the
train/test resize scales (``input_pipeline.datasets`` defaults) and the slide
window.

Batches are global: the official per-GPU batch times the paper's 8 GPUs.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import ml_collections

from experiments.configs import common

# The paper trains on 8 GPUs; official batch sizes are per GPU.
OFFICIAL_GPUS = 8

# Training crop (h, w) per dataset; the slide-inference window is the same size.
CROP_SIZE = {
    "ade20k": (512, 512),
    "coco_stuff164k": (512, 512),
    "cityscapes": (1024, 1024),
    "pascal_context59": (480, 480),
    "bdd100k": (512, 1024),
}

# Slide-inference stride (h, w) per dataset.
SLIDE_STRIDE = {
    "ade20k": (480, 480),
    "coco_stuff164k": (480, 480),
    "cityscapes": (768, 768),
    "pascal_context59": (320, 320),
    "bdd100k": (384, 768),
}


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Iterations and batch of one official config.

  Attributes:
    total_steps: training steps, which is also where the poly decay ends.
    eval_every: the official validation interval; checkpoints are written at
      the same steps.
    per_gpu_batch: the official ``train_dataloader.batch_size``.
  """
  total_steps: int
  eval_every: int
  per_gpu_batch: int = 2

  @property
  def batch_size(self) -> int:
    """Global batch: the per-GPU batch on the paper's 8 GPUs."""
    return self.per_gpu_batch * OFFICIAL_GPUS


# The three schedules of the official configs.
ITERS_160K = Schedule(160_000, 16_000)
ITERS_80K = Schedule(80_000, 8_000)
# COCO-Stuff configs named "160k" whose poly decay ends at 80k (max_iters 160k,
# val_interval 16k): the last 80k official iterations run at lr 0, so we train
# 80k and keep the official 16k validation interval.
ITERS_80K_FROM_160K = Schedule(80_000, 16_000)


@dataclasses.dataclass(frozen=True)
class Choice:
  """A parsed ``'VARIANT,DATASET'`` argument."""
  variant: str          # without the '_ol' suffix, e.g. 'b0'
  offset_learning: bool
  dataset: str


def parse_arg(arg: str | None, *, config_file: str, datasets_of: Mapping[str, tuple[str, ...]],
              ol_suffix: bool) -> Choice:
  """Parses ``'VARIANT,DATASET'`` against the combinations a family has.

  Args:
    arg: the text after ':' in ``--config=FILE.py:ARG``, e.g. ``'t,ade20k'``.
    config_file: the config's file name, for error messages.
    datasets_of: variant -> the datasets it has an official config for.
    ol_suffix: whether variants come with and without ``'_ol'`` (SegFormer,
      SegNeXt: with = the Offset Learning head, without = the plain baseline).
      OffSeg always uses Offset Learning and takes no suffix.

  Returns:
    The variant, whether it uses Offset Learning, and the dataset.

  Raises:
    ValueError: naming the valid choices, when ``arg`` is missing, malformed or
      not an official combination.
  """
  variants = list(datasets_of)
  if ol_suffix:
    variants = [v + s for v in variants for s in ("", "_ol")]
  usage = (f"{config_file} takes 'VARIANT,DATASET' (e.g. "
           f"'{config_file}:{variants[-1]},{datasets_of[next(iter(datasets_of))][0]}'); "
           f"variants: {', '.join(variants)}")
  parts = [p.strip().lower() for p in (arg or "").split(",")]
  if len(parts) != 2 or not all(parts):
    raise ValueError(f"{usage}; got {arg!r}")
  token, dataset = parts
  offset_learning = not ol_suffix or token.endswith("_ol")
  variant = token[:-len("_ol")] if ol_suffix and token.endswith("_ol") else token
  if variant not in datasets_of:
    raise ValueError(f"unknown variant {token!r}. {usage}")
  if dataset not in datasets_of[variant]:
    raise ValueError(f"{token!r} has no official config for dataset {dataset!r}; "
                     f"valid datasets for {token!r}: {', '.join(datasets_of[variant])}")
  return Choice(variant, offset_learning, dataset)


def experiment_config(*, model_name: str, dataset: str, schedule: Schedule, eval_mode: str,
                      size_divisor: int = 0) -> ml_collections.ConfigDict:
  """One official training config on top of ``common.base_config()``.

  Args:
    model_name: a registered model.
    dataset: a dataset of ``CROP_SIZE``.
    schedule: its iterations, interval and batch.
    eval_mode: ``'slide'`` (window ``CROP_SIZE``, stride ``SLIDE_STRIDE``) or
      ``'whole'``.
    size_divisor: pad test images bottom/right to a multiple of this (SegNeXt's
      data preprocessor pads to 32 in every mode); 0 = no padding.
  """
  c = common.base_config()
  c.batch_size = schedule.batch_size
  c.total_steps = schedule.total_steps
  c.eval_every = schedule.eval_every
  c.checkpoint_every = schedule.eval_every

  c.model = common.model_config(model_name)
  c.data = common.data_config(dataset, crop_size=CROP_SIZE[dataset])

  c.eval.mode = eval_mode
  c.eval.crop_size = CROP_SIZE[dataset]
  c.eval.stride = SLIDE_STRIDE[dataset]
  c.eval.size_divisor = size_divisor
  return c
