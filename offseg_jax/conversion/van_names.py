"""Key rewrites that bring the published VAN checkpoints to our (VAN-Segmentation) names.

Three layouts of the same VAN weights exist:

  * VAN-Segmentation (the parity fixture, our module names): ``patch_embed{i}.proj``,
    ``patch_embed{i}.norm``, ``block{i}.{j}.{norm1,attn.proj_1,
    attn.spatial_gating_unit.{conv0,conv_spatial,conv1},attn.proj_2,norm2,mlp.fc1,
    mlp.dwconv.dwconv,mlp.fc2,layer_scale_1,layer_scale_2}``, ``norm{i}``;
  * VAN-Classification (the ImageNet ``van_b0.pth`` ... files a user fine-tunes
    from): the same keys without prefix, plus the classifier ``head.weight`` /
    ``head.bias``, which a segmentation backbone does not have;
  * mmseg ``projects/van`` (VAN built on mmseg's MSCAN modules): the MLP's
    depthwise conv sits directly at ``mlp.dwconv`` instead of inside a ``DWConv``
    wrapper (``mlp.dwconv.dwconv``).

:func:`van_state_dict_to_ours` maps the last two onto the first; it is a pure
function of the state dict (the input is not modified) and leaves every other key
as it is, so a wrong or partial checkpoint still fails conversion with its
missing / unexpected keys named.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

# The large-kernel attention's dilated depthwise conv exists only in VAN.
_VAN_MARKER = re.compile(r"(^|\.)block\d+\.\d+\.attn\.spatial_gating_unit\.conv_spatial\.weight$")
# mmseg projects/van: ``...block{i}.{j}.mlp.dwconv.{weight,bias}``.
_MMSEG_DWCONV = re.compile(r"^(?P<stem>(.*\.)?block\d+\.\d+\.mlp\.dwconv)\.(?P<leaf>weight|bias)$")
# The ImageNet classifier of VAN-Classification (top level, no prefix).
_CLASSIFIER = re.compile(r"^head\.")


def is_van_state_dict(state: Mapping[str, Any]) -> bool:
  """Whether ``state`` holds VAN weights (any of the three layouts, any prefix)."""
  return any(_VAN_MARKER.search(k) for k in state)


def van_state_dict_to_ours(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """Rewrites VAN-Classification / mmseg-projects keys to our names.

  Args:
    state: a VAN state dict (bare backbone keys, or with a prefix such as
      ``backbone.``).

  Returns:
    ``(new_state, changes)``: the rewritten state dict (same values, same order)
    and ``{'renamed': {old: new}, 'dropped': [keys]}``. Dropped: the top-level
    classifier ``head.*`` of an ImageNet checkpoint. Renamed: mmseg's
    ``mlp.dwconv.{weight,bias}`` -> ``mlp.dwconv.dwconv.{weight,bias}``.
  """
  out: dict[str, Any] = {}
  renamed: dict[str, str] = {}
  dropped: list[str] = []
  for key, value in state.items():
    if _CLASSIFIER.match(key):
      dropped.append(key)
      continue
    match = _MMSEG_DWCONV.match(key)
    if match:
      new = f"{match['stem']}.dwconv.{match['leaf']}"
      renamed[key] = new
      key = new
    if key in out:
      raise ValueError(f"VAN key rewrite collides on {key!r} (both layouts in one file?)")
    out[key] = value
  return out, {"renamed": renamed, "dropped": dropped}


def describe_changes(changes: Mapping[str, Any]) -> list[str]:
  """One log line per kind of change made by :func:`van_state_dict_to_ours`."""
  lines = []
  if changes["dropped"]:
    lines.append(f"VAN: dropped the ImageNet classifier ({', '.join(changes['dropped'])})")
  if changes["renamed"]:
    lines.append(f"VAN: renamed {len(changes['renamed'])} mmseg 'mlp.dwconv' keys to "
                 "'mlp.dwconv.dwconv'")
  return lines
