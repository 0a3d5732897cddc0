"""A PyTorch reference point anyone can install: Hugging Face SegFormer-B0.

``python -m offseg_jax.tools.benchmark --compare=torch`` times this next to our
model (``pip install -e .[compare]`` adds torch and transformers; nothing else
in the toolkit needs them). The model is transformers'
``SegformerForSemanticSegmentation`` with the MiT-B0 sizes (hidden sizes
32/64/160/256, depths 2/2/2/2, decoder 256), randomly initialised, no download.

What is timed, to match our ``train`` and ``whole`` modes:

* ``train``: forward, logits resized bilinearly (``align_corners=False``) to
  the label size and cross-entropy with ignore index 255 (the model's own loss),
  backward, AdamW with mmseg's SegFormer parameter groups (decode head lr x10,
  no weight decay on norms), ``zero_grad(set_to_none=True)``;
* ``whole``: ``eval()`` forward under ``inference_mode``, resize to the input
  size, argmax.

``compiled=True`` wraps the model in ``torch.compile`` (inductor; the
optimizer step stays eager). On CUDA every timed iteration ends with
``torch.cuda.synchronize()``; ``dtype='bfloat16'`` runs under
``torch.autocast`` with float32 weights, as mixed-precision training does.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import numpy as np

HIDDEN_SIZES = (32, 64, 160, 256)


def _require_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"--compare=torch needs torch and transformers ({e}); install them with "
        "`pip install -e .[compare]`") from None
  return torch, transformers


def segformer_b0(num_classes: int):
  """transformers' SegFormer-B0 for ``num_classes`` classes, random weights."""
  _, transformers = _require_torch()
  config = transformers.SegformerConfig(
      num_channels=3, num_encoder_blocks=4, depths=[2, 2, 2, 2], sr_ratios=[8, 4, 2, 1],
      hidden_sizes=list(HIDDEN_SIZES), patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2],
      num_attention_heads=[1, 2, 5, 8], mlp_ratios=[4, 4, 4, 4], decoder_hidden_size=256,
      num_labels=num_classes, semantic_loss_ignore_index=255)
  return transformers.SegformerForSemanticSegmentation(config)


def parameter_groups(model, lr: float, weight_decay: float) -> list[dict]:
  """mmseg's SegFormer groups: decode head x10 lr; norms without weight decay."""
  groups: dict[tuple[bool, bool], list] = {}
  for name, param in model.named_parameters():
    head = name.startswith("decode_head.")
    norm = "norm" in name          # layer_norm*, batch_norm
    groups.setdefault((head, norm), []).append(param)
  return [{"params": params, "lr": lr * (10.0 if head else 1.0),
           "weight_decay": 0.0 if norm else weight_decay}
          for (head, norm), params in sorted(groups.items())]


def _timings(fn: Callable[[], Any], steps: int, warmup: int, sync: Callable[[], None]
             ) -> tuple[float, list[float]]:
  """(first call seconds, seconds of each timed call) of ``fn``."""
  start = time.perf_counter()
  fn()
  sync()
  first = time.perf_counter() - start
  for _ in range(warmup):
    fn()
  sync()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    sync()
    times.append(time.perf_counter() - start)
  return first, times


def benchmark(*, batch: int, size: tuple[int, int], num_classes: int = 150,
              steps: int = 10, warmup: int = 2, compiled: bool = False,
              dtype: str = "float32", device: str = "cpu", threads: int | None = None,
              modes=("train", "whole"), lr: float = 6e-5, weight_decay: float = 0.01,
              seed: int = 0) -> dict[str, Any]:
  """Times SegFormer-B0 in PyTorch; returns ``{mode: {median_s, times_s, ...}}``."""
  torch, transformers = _require_torch()
  if threads:
    torch.set_num_threads(int(threads))
  torch.manual_seed(seed)
  dev = torch.device(device)
  model = segformer_b0(num_classes).to(dev)
  height, width = size
  rng = np.random.default_rng(seed)
  images = torch.from_numpy(rng.standard_normal((batch, 3, height, width), np.float32)).to(dev)
  labels = rng.integers(0, num_classes, (batch, height, width)).astype(np.int64)
  labels[:, : height // 8] = 255                        # some ignored pixels, as ours
  labels = torch.from_numpy(labels).to(dev)
  sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
  autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
  runner = torch.compile(model) if compiled else model
  results: dict[str, Any] = {
      "model": "transformers SegformerForSemanticSegmentation (MiT-B0)",
      "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
      "torch": torch.__version__, "transformers": transformers.__version__,
      "compiled": compiled, "dtype": dtype, "device": str(dev), "batch": batch,
      "size": [height, width], "threads": torch.get_num_threads(), "steps": steps,
      "warmup": warmup}

  if "train" in modes:
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model, lr, weight_decay), lr=lr,
                                  betas=(0.9, 0.999), weight_decay=weight_decay)

    def train_step():
      with autocast:
        loss = runner(pixel_values=images, labels=labels).loss
      loss.backward()
      optimizer.step()
      optimizer.zero_grad(set_to_none=True)
      return loss

    if dev.type == "cuda":
      torch.cuda.reset_peak_memory_stats(dev)
    first, times = _timings(train_step, steps, warmup, sync)
    results["train"] = _summary(first, times, batch)
    if dev.type == "cuda":
      results["train"]["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(dev))

  if "whole" in modes:
    model.eval()

    def forward():
      with torch.inference_mode(), autocast:
        logits = runner(pixel_values=images).logits
        logits = torch.nn.functional.interpolate(logits.float(), size=(height, width),
                                                 mode="bilinear", align_corners=False)
        return logits.argmax(dim=1)

    first, times = _timings(forward, steps, warmup, sync)
    results["whole"] = _summary(first, times, batch)
  return results


def _summary(first: float, times: list[float], batch: int) -> dict[str, Any]:
  median = statistics.median(times)
  return {"median_s": median, "images_per_s": batch / median, "times_s": times,
          "first_call_s": first}
