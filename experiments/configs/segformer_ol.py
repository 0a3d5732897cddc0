r"""SegFormer (MiT-B0..B5) with and without Offset Learning, official OffSeg recipe.

From HVision-NKU/OffSeg ``local_configs/segformer_offset_learning``. Argument
``VARIANT,DATASET`` with VARIANT in b0..b5 (plain SegFormer head, model
``segformer_bN``) or b0_ol..b5_ol (Offset Learning head, ``segformer_bN_ol``):

  | arg                       | steps | batch | crop | eval (window/stride) | val+ckpt every |
  |---------------------------|-------|-------|------|----------------------|----------------|
  | bN_ol,ade20k         (bN) | 160k  | 16    | 512  | slide 512/480        | 16k            |
  | bN_ol,coco_stuff164k (bN) | 80k   | 16    | 512  | slide 512/480        | 8k             |

Batch 16 = 2 per GPU x 8 GPUs; AdamW 6e-5, warm-up 1500 + poly to
``total_steps``. B5 also trains at 512 (mmseg's stock B5-ADE uses 640). There
are no Cityscapes or Pascal-Context SegFormer-OL configs. The baselines (no
``_ol``) use the same recipe, for a like-for-like comparison; mmseg's own
SegFormer configs evaluate ADE whole-image (``--config.eval.mode=whole``).

Initialise the backbone with the mmsegmentation ImageNet MiT checkpoint, converted once:

  wget https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/segformer/mit_b0_20220624-7e0fe6dd.pth
  python -m offseg_jax.convert --model segformer_b0_ol --backbone-only \
      mit_b0_20220624-7e0fe6dd.pth converted/mit_b0

then launch (rerunning the same command resumes from the last checkpoint):

  python -m offseg_jax.main --config=experiments/configs/segformer_ol.py:b0_ol,ade20k \
      --workdir=workdirs/segformer_b0_ol_ade20k --config.init_from=converted/mit_b0 \
      --config.data.root=data/ade/ADEChallengeData2016

(``BACKBONE_CHECKPOINTS`` below has every size's file.) Without
``--config.init_from`` the whole model starts from random weights.
"""

from experiments.configs import official

_MIT_URL = "https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/segformer/"

# variant -> mmseg's ImageNet MiT checkpoint (the official configs' init_cfg).
BACKBONE_CHECKPOINTS = {
    "b0": _MIT_URL + "mit_b0_20220624-7e0fe6dd.pth",
    "b1": _MIT_URL + "mit_b1_20220624-02e5a6a1.pth",
    "b2": _MIT_URL + "mit_b2_20220624-66e8bf70.pth",
    "b3": _MIT_URL + "mit_b3_20220624-13b1141c.pth",
    "b4": _MIT_URL + "mit_b4_20220624-d588d980.pth",
    "b5": _MIT_URL + "mit_b5_20220624-658746d9.pth",
}

# dataset -> schedule (the same for every size).
SCHEDULES = {
    "ade20k": official.ITERS_160K,
    "coco_stuff164k": official.ITERS_80K,
}


def get_config(arg: str | None = None):
  """The official config of ``arg`` = ``'VARIANT,DATASET'``, e.g. ``'b0_ol,ade20k'``."""
  datasets_of = {v: tuple(SCHEDULES) for v in BACKBONE_CHECKPOINTS}
  choice = official.parse_arg(arg, config_file="segformer_ol.py", datasets_of=datasets_of,
                              ol_suffix=True)
  suffix = "_ol" if choice.offset_learning else ""
  return official.experiment_config(
      model_name=f"segformer_{choice.variant}{suffix}", dataset=choice.dataset,
      schedule=SCHEDULES[choice.dataset], eval_mode="slide")
