"""Class names and colour palettes of every supported dataset.

Class order is the training-id order of the standard (mmseg-compatible) label
files, so ``CLASS_NAMES[k]`` names label value ``k`` after ``reduce_zero_label``.

Palettes are for visualisation only. Cityscapes and BDD100K use the colours of
the Cityscapes label definition (BDD100K adopted the same 19 classes and
colours). The other datasets have no colour table of their own, so they get a
generated one (``generated_palette``): distinct, deterministic, never black (black
is left for ignored pixels in overlays).
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255


def _names(text: str) -> tuple[str, ...]:
  """Class names from comma-separated text.

  The line break and indentation before a name are dropped; anything else is
  part of it (mmseg's ADE20K class 7 is ``'bed '``, written ``bed ,``).
  """
  return tuple(name.lstrip() for name in text.rstrip().split(","))


# mmseg's ADE20K names, 'bed ' with its trailing space: reports and metrics.json
# name classes exactly as mmseg does.
ADE20K = _names("""
    wall, building, sky, floor, tree, ceiling, road, bed , windowpane, grass, cabinet, sidewalk,
    person, earth, door, table, mountain, plant, curtain, chair, car, water, painting, sofa,
    shelf, house, sea, mirror, rug, field, armchair, seat, fence, desk, rock, wardrobe, lamp,
    bathtub, railing, cushion, base, box, column, signboard, chest of drawers, counter, sand,
    sink, skyscraper, fireplace, refrigerator, grandstand, path, stairs, runway, case,
    pool table, pillow, screen door, stairway, river, bridge, bookcase, blind, coffee table,
    toilet, flower, book, hill, bench, countertop, stove, palm, kitchen island, computer,
    swivel chair, boat, bar, arcade machine, hovel, bus, towel, light, truck, tower, chandelier,
    awning, streetlight, booth, television receiver, airplane, dirt track, apparel, pole, land,
    bannister, escalator, ottoman, bottle, buffet, poster, stage, van, ship, fountain,
    conveyer belt, canopy, washer, plaything, swimming pool, stool, barrel, basket, waterfall,
    tent, bag, minibike, cradle, oven, ball, food, step, tank, trade name, microwave, pot,
    animal, bicycle, lake, dishwasher, screen, blanket, sculpture, hood, sconce, vase,
    traffic light, tray, ashcan, fan, pier, crt screen, plate, monitor, bulletin board, shower,
    radiator, glass, clock, flag""")

CITYSCAPES = _names("""
    road, sidewalk, building, wall, fence, pole, traffic light, traffic sign, vegetation,
    terrain, sky, person, rider, car, truck, bus, train, motorcycle, bicycle""")

# Colours of the 19 training classes in the Cityscapes label definition (RGB).
CITYSCAPES_PALETTE = np.array(
    [[128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156],
     [190, 153, 153], [153, 153, 153], [250, 170, 30], [220, 220, 0],
     [107, 142, 35], [152, 251, 152], [70, 130, 180], [220, 20, 60], [255, 0, 0],
     [0, 0, 142], [0, 0, 70], [0, 60, 100], [0, 80, 100], [0, 0, 230],
     [119, 11, 32]], dtype=np.uint8)

# Cityscapes label id (0..33, the values of *_gtFine_labelIds.png) -> train id.
# Ids absent from this table (void classes, parking, rail track, guard rail,
# bridge, tunnel, polegroup, caravan, trailer) train as ignored (255).
CITYSCAPES_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}

COCO_STUFF164K = _names("""
    person, bicycle, car, motorcycle, airplane, bus, train, truck, boat, traffic light,
    fire hydrant, stop sign, parking meter, bench, bird, cat, dog, horse, sheep, cow, elephant,
    bear, zebra, giraffe, backpack, umbrella, handbag, tie, suitcase, frisbee, skis, snowboard,
    sports ball, kite, baseball bat, baseball glove, skateboard, surfboard, tennis racket,
    bottle, wine glass, cup, fork, knife, spoon, bowl, banana, apple, sandwich, orange,
    broccoli, carrot, hot dog, pizza, donut, cake, chair, couch, potted plant, bed,
    dining table, toilet, tv, laptop, mouse, remote, keyboard, cell phone, microwave, oven,
    toaster, sink, refrigerator, book, clock, vase, scissors, teddy bear, hair drier,
    toothbrush, banner, blanket, branch, bridge, building-other, bush, cabinet, cage, cardboard,
    carpet, ceiling-other, ceiling-tile, cloth, clothes, clouds, counter, cupboard, curtain,
    desk-stuff, dirt, door-stuff, fence, floor-marble, floor-other, floor-stone, floor-tile,
    floor-wood, flower, fog, food-other, fruit, furniture-other, grass, gravel, ground-other,
    hill, house, leaves, light, mat, metal, mirror-stuff, moss, mountain, mud, napkin, net,
    paper, pavement, pillow, plant-other, plastic, platform, playingfield, railing, railroad,
    river, road, rock, roof, rug, salad, sand, sea, shelf, sky-other, skyscraper, snow,
    solid-other, stairs, stone, straw, structural-other, table, tent, textile-other, towel,
    tree, vegetable, wall-brick, wall-concrete, wall-other, wall-panel, wall-stone, wall-tile,
    wall-wood, water-other, waterdrops, window-blind, window-other, wood""")

# The 59 Pascal-Context classes in training-id order (background removed by
# reduce_zero_label; the converted masks number them alphabetically from 1).
PASCAL_CONTEXT59 = _names("""
    aeroplane, bag, bed, bedclothes, bench, bicycle, bird, boat, book, bottle, building, bus,
    cabinet, car, cat, ceiling, chair, cloth, computer, cow, cup, curtain, dog, door, fence,
    floor, flower, food, grass, ground, horse, keyboard, light, motorbike, mountain, mouse,
    person, plate, platform, pottedplant, road, rock, sheep, shelves, sidewalk, sign, sky, snow,
    sofa, table, track, train, tree, truck, tvmonitor, wall, water, window, wood""")

BDD100K = CITYSCAPES


def generated_palette(num_classes: int) -> np.ndarray:
  """A deterministic ``[num_classes, 3]`` uint8 RGB palette of distinct colours.

  The bits of ``k + 1`` are spread over the high bits of R, G and B (the classic
  VOC colour-map construction), so neighbouring ids get very different colours
  and no class is black.
  """
  palette = np.zeros((num_classes, 3), np.uint8)
  for k in range(num_classes):
    code, colour = k + 1, [0, 0, 0]
    for bit in range(7, -1, -1):
      for channel in range(3):
        colour[channel] |= ((code >> channel) & 1) << bit
      code >>= 3
    palette[k] = colour
  return palette


# name -> (class names, palette or None for a generated one)
DATASET_CLASSES = {
    "ade20k": (ADE20K, None),
    "cityscapes": (CITYSCAPES, CITYSCAPES_PALETTE),
    "coco_stuff164k": (COCO_STUFF164K, None),
    "pascal_context59": (PASCAL_CONTEXT59, None),
    "bdd100k": (BDD100K, CITYSCAPES_PALETTE),
}


def class_names(dataset: str) -> tuple[str, ...]:
  """Class names (training-id order) of a built-in dataset."""
  return DATASET_CLASSES[dataset][0]


def palette(dataset: str) -> np.ndarray:
  """``[num_classes, 3]`` uint8 RGB palette of a built-in dataset."""
  names, colours = DATASET_CLASSES[dataset]
  return colours if colours is not None else generated_palette(len(names))
