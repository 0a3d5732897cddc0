"""Config pieces shared by every experiment (``get_config`` files build on these).

Every training config exposes at least ``seed``, ``batch_size`` (global, over all
processes and devices), ``total_steps``, ``eval_every``, ``model.name``,
``data.name`` and ``data.root``. Durations are in optimizer steps.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from input_pipeline import datasets
from offseg_jax.models import compose


def base_config() -> ml_collections.ConfigDict:
  """Trainer fields with the official OffSeg recipe's optimizer (§4.1-4.2)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 16                 # global batch
  c.total_steps = 160_000
  c.eval_every = 16_000
  c.checkpoint_every = 16_000
  c.log_every = 50
  c.keep_checkpoints = 2
  c.init_from = ""                  # converted checkpoint (full model or --backbone-only)
  # Micro-batches per optimizer step (gradients summed in float32 under a scan, so
  # activations of one micro-batch of batch_size / k are alive at a time). Equal to
  # the full batch for BatchNorm-free models; BatchNorm models normalise each
  # micro-batch with its own statistics (see offseg_jax.train.make_train_step).
  c.grad_accum_steps = 1
  # Host -> device images: 'uint8' (normalised on device; 4x fewer bytes) or
  # 'float32' (normalised on the host). Both give the same training batch.
  c.transfer_dtype = "uint8"

  c.model = model_config("offseg_t")

  c.losses = ml_collections.ConfigDict()
  c.losses.cross_entropy = ml_collections.ConfigDict(
      {"weight": 1.0, "avg_non_ignore": False, "ignore_index": 255})

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 6e-5
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.01
  c.optimizer.warmup_steps = 1500
  c.optimizer.warmup_start_factor = 1e-6
  c.optimizer.poly_power = 1.0
  c.optimizer.end_lr = 0.0
  c.optimizer.grad_clip_norm = 0.0  # 0 = no clipping (official OffSeg recipe)
  # mmengine paramwise custom_keys: longest key first, first match wins.
  c.optimizer.custom_keys = ml_collections.ConfigDict({
      "pos_block": {"decay_mult": 0.0},
      "norm": {"decay_mult": 0.0},
      "head": {"lr_mult": 10.0},
  })

  c.eval = ml_collections.ConfigDict()
  c.eval.mode = "slide"             # 'whole' | 'slide'
  c.eval.crop_size = (512, 512)
  c.eval.stride = (480, 480)
  c.eval.size_divisor = 0           # 32 pads test images as SegNeXt does
  c.eval.batch_size = 8             # global images per eval step (rounded up to the devices)
  c.eval.buckets_per_octave = 4     # image-size buckets (padding < 1/4 a side); 0 = exact sizes
  c.eval.tta = False
  c.eval.tta_ratios = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
  c.eval.tta_flip = True
  c.eval.metrics = ("mIoU",)
  c.eval.nan_to_num = config_dict.placeholder(float)

  # Device mesh (offseg_jax.sharding): named axes, one size each, exactly one -1
  # (the remaining devices). The batch is split over mesh.batch_axes (None: every
  # axis). Default: one 'data' axis over all devices, everything replicated.
  c.mesh = ml_collections.ConfigDict({"shape": (-1,), "axes": ("data",),
                                      "batch_axes": config_dict.placeholder(tuple)})
  # State placement: ordered (regex, rule) pairs over parameter-relative paths
  # ('backbone/stem/conv/kernel'; optimizer moments follow their parameter),
  # first match wins, unmatched leaves replicated. A rule is 'replicate',
  # 'fsdp' / 'fsdp:<axis>' (largest divisible dimension split over the axis,
  # leaves of at least fsdp_min_size elements) or a PartitionSpec tuple such as
  # (None, None, None, "fsdp"). FSDP over pairs of devices, batch over all:
  #   --config.mesh.shape='(-1,2)' --config.mesh.axes='("data","fsdp")' \
  #   --config.sharding_rules='((".*","fsdp"),)'
  c.sharding_rules = ((".*", "replicate"),)
  c.fsdp_min_size = 2 ** 14         # elements (64 KiB in float32)
  # BatchNorm statistics in training: 'global' (SyncBN over the global batch, as
  # the official recipes train) or 'per_device' (each device its own examples,
  # torch DDP without SyncBN).
  c.batchnorm_statistics = "global"
  return c


def model_config(name: str) -> ml_collections.ConfigDict:
  """``config.model`` for a registered model: name, classifier, dtype and parts.

  Every head ends in a selectable classifier (``offset_learning`` | ``conv`` |
  ``class_offset`` | ``feature_offset``, see offseg_jax/models/classifiers.py):
  the OffSeg models and the ``*_ol`` variants default to Offset Learning, the
  others to their preset's classifier. ``pixel_linear`` has no head to switch.

  ``dtype`` is the compute dtype (``float32`` | ``bfloat16``); parameters,
  optimizer state, losses and metrics stay float32. ``remat=True``
  rematerialises the whole backbone: its activations are not kept for the
  backward pass but recomputed (one extra backbone forward per step, less
  activation memory; see ``EncoderDecoder.remat``). ``backbone``, ``refiner``, ``neck``,
  ``head`` and ``projection`` swap a part of the preset by its registered name
  ('' keeps the preset's); composed presets (ECENet, FRM) also expose their parts'
  fields as ``<slot>_args``.
  """
  m = ml_collections.ConfigDict()
  m.name = name
  m.dtype = "float32"
  m.remat = False
  # How convolutions are traced: 'auto' = the CPU-tuned forms on CPU only,
  # 'conv' = XLA convolutions everywhere, 'shift' = the CPU forms everywhere.
  m.conv_impl = "auto"
  if name == "pixel_linear":
    return m
  spec = compose.COMPOSITIONS.get(name, {})
  ol = name.startswith("offseg") or name.endswith("_ol")
  m.classifier = spec.get("classifier") or ("offset_learning" if ol else "conv")
  for slot in compose.SLOTS:
    m[slot] = ""
  if name in compose.COMPOSED_PRESETS:
    for slot in compose.SLOTS:
      if spec.get(slot):
        m[f"{slot}_args"] = ml_collections.ConfigDict(dict(spec[slot][1]))
  return m


def data_config(name: str, **overrides) -> ml_collections.ConfigDict:
  """The dataset's full field set with official defaults, then ``overrides``."""
  d = datasets.default_data_config(name)
  for k, v in overrides.items():
    d[k] = v
  return d
