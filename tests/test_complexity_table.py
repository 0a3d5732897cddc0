"""The complexity table: paper-convention counts and the report (tracing only)."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import pytest

from offseg_jax import models
from offseg_jax.tools import complexity, complexity_table


def _official(shared_dir, model):
  rows = {r["model"]: r for r in json.loads((shared_dir / "parity" / "figures.json").read_text())}
  return rows[model]


def test_offseg_conv_count_matches_the_official_counter(shared_dir):
  # The official conv-only count includes EfficientFormerV2's talking heads
  # (1x1 Conv2d there, an einsum here): 8 mixers x 8x8 heads x 256^2 pairs.
  official = _official(shared_dir, "offseg_t")
  counts = complexity_table.count("offseg_t", 150, (512, 512))
  assert counts.params == pytest.approx(official["params_M"] * 1e6, abs=500)
  assert counts.conv_macs / 1e9 == pytest.approx(
      official["ade20k_1x3x512x512"]["gmacs_conv_only"], abs=1e-4)
  assert counts.matmul_macs / 1e9 == pytest.approx(
      official["ade20k_1x3x512x512"]["gmacs_all"], abs=1e-3)
  assert complexity_table.paper_gmacs("offseg_t", counts) == counts.conv_macs / 1e9


def test_segnext_paper_convention_is_conv_plus_matmul(shared_dir):
  official = _official(shared_dir, "segnext_t_ol")["ade20k_1x3x512x512"]
  counts = complexity_table.count("segnext_t_ol", 150, (512, 512))
  assert complexity_table.paper_gmacs("segnext_t_ol", counts) == pytest.approx(
      official["gmacs_all"], abs=1e-3)


def test_report_counts_agreement_and_explains_known_disagreements():
  counts = complexity_table.Counts(params=1, conv_macs=6_309_000_000,
                                   matmul_macs=6_309_000_000, seconds=0.0)
  rows = [
      complexity_table.Row("segnext_t", "params", 4.263, 4.3),
      complexity_table.Row("segnext_t", "pascal_context59", 6.309, 6.6, counts),
      complexity_table.Row("segnext_s", "ade20k", 1.0, 15.9, counts),
      complexity_table.Row("segnext_s", "cityscapes", None, 124.6, skipped="trace exceeded 1 s"),
  ]
  assert rows[0].agrees and not rows[1].agrees and not rows[3].agrees
  report = complexity_table.to_markdown(rows, "cmd")
  assert "1 of 3 counted rows agree" in report
  assert "segnext_t, PC-59: ours 6.309, paper 6.6 (ratio 0.956) [reused]" in report
  assert "segnext_s, ADE20K" in report and "(no explanation known)" in report
  assert "Skipped (trace too slow): segnext_s cityscapes" in report


def test_both_tools_print_one_paper_figure_talking_heads_counted_as_convs(capsys):
  # OffSeg-nano: EfficientFormerV2 with one attention block (4 talking heads) in
  # stages 2 and 3; at 128x128 both attend over 4x4 = 16 tokens.
  counts = complexity_table.count("offseg_nano", 19, (128, 128))
  argv = ["--model", "offseg_nano", "--num-classes", "19", "--size", "128,128", "--no-xla"]
  assert complexity.main(argv + ["--json"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["paper_gflops"] == complexity_table.paper_gmacs("offseg_nano", counts)
  assert result["paper_gflops"] == result["conv_gmacs"] == counts.conv_macs / 1e9
  assert result["matmul_gmacs"] == counts.matmul_macs / 1e9
  assert complexity.main(argv) == 0
  assert f"paper convention: {counts.conv_macs / 1e9:.3f} GFLOPs" in capsys.readouterr().out
  # The official 1x1 Conv2d talking heads (an einsum here) count as convolutions:
  # 2 blocks x 2 mixers x heads^2 x tokens^2 above the plain convolution count.
  jaxpr, _, _, _ = complexity.trace_forward(models.build_model({"name": "offseg_nano"}, 19),
                                            (128, 128))
  assert counts.conv_macs - complexity.conv_macs(jaxpr) == 2 * 2 * 4 ** 2 * 16 ** 2
  # Families without a paper convention get no paper figure.
  assert complexity.paper_gmacs("swin_tiny", complexity.MacCounts(1, 2)) is None


def test_parameter_table_lists_every_parameter_without_reading_values():
  model = models.build_model({"name": "offseg_nano"}, 5)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  table = complexity.parameter_table(abstract["params"])     # shapes only, as the trainer has
  leaves = jax.tree_util.tree_leaves_with_path(abstract["params"])
  total = sum(math.prod(leaf.shape) for _, leaf in leaves)
  assert f"Total: {total:,}" in table
  rows = [line for line in table.splitlines() if line.startswith("| ") and "Name" not in line]
  assert len(rows) == len(leaves)
  assert any("/token_mixer/talking_head1/kernel " in row and "(1, 1, 4, 4)" in row
             for row in rows)
