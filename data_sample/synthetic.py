"""Synthetic SocioSeg-style tiles: the generator of data_sample/ (`python socioreasoner.py make-data` runs it,
and the tests use it). It lives beside the data it made; socioreasoner.py loads it by path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

DATA_SAMPLE_SIZES = (512, 64)       # train, val tiles in data_sample/

# SocioSeg itself cannot be downloaded on every machine, and tests must never download anything, so the
# project ships a few tiles made by this seeded generator, in the raw-file layout. Each tile holds two kinds
# of place, a school and a park: the digital map shows each as a shape marked by its kind (the school a
# rectangular block, the park an oval), the satellite image shows the ground, grey speckle with each place's
# ground tinted (what the stand-in segmenter grows into). The target text names one place, as a class
# ("school", "park") or a function ("educational", "green space"); the mask is that place. So the text
# decides: on the same tile "park" and "school" are different targets. The park's oval fills ~79 % of its
# box: a box alone (stage 1) cannot cover it exactly, points that grow into its tinted ground (stage 2) can.
#
# Why the map's background is a colour gradient (red grows left to right, green top to bottom). Qwen2.5-VL
# has no absolute position embedding: where an image token lies enters only through rotary positions inside
# attention. A pretrained model has learnt to turn that into "this is the top-left corner"; a random tiny one
# has not, so what it reads from a token says *what* is there, never *where*, and it cannot answer a box.
# Measured (supervised steps only): without a position cue in the images the tiny model stayed at the blind
# baseline for 1,000+ steps, even with one square per tile; with the gradient it localises within a few
# hundred. The gradient is the demo's stand-in for the position sense pretraining gives: each map pixel
# carries its coordinates as colour. Real SocioSeg maps need no such thing; the report's blank tiles remove
# it too. A place keeps the gradient in its red and green and shows its kind in its blue, so its own pixels
# say where they are (a flat-coloured place hid it: only its edges could tell).
#
# Why places sit on a grid of an eighth of the tile (28 px of 224; the processor halves the tile, so a cell
# is one 14-px vision patch), 2-4 cells across: the tiny model then learns which patches a place covers,
# not where inside a patch its edge falls. Measured, 600 supervised steps (stage 1 alone, 200 with the place
# alone), held-out gIoU, seeds 1 / 2: places anywhere, 9.7 / 7.9 % (blind 6.3; with lr 3e-3 8.1 / 6.2); on
# the grid, 24.0 / 38.7 % (blind 11.0), the token-mean loss at step 200 0.41 against 1.12. Free places with
# flat colours (an earlier version of this world) localised for one seed of three within a 1,200-step
# warm-up. What else was tried and learnt more slowly or not at all: irregular polygons, textured satellite
# ground, a fixed 2-D position code added to the vision tower's output. Two kinds of place a tile are learnt
# with the warm-up's curriculum (socioreasoner.py, TINY_DEFAULTS), which uses target_alone and other_kind
# below; the held-out report names the other kind too, to show that the text is read.
#
# kinds=2 (the demo's world): a school and a park on every tile. kinds=1: one place a tile, of either kind.
# 512 training tiles with 4 x 4-pixel satellite grains keep data_sample/ at ~6 MB. Regenerate it with:
#   python socioreasoner.py make-data --out data_sample

PLACE_KINDS = {
    # class     function       map blue  satellite tint    shape      (the map's ground: blue 200)
    "school":  ("educational", 20,       (40, -25, -35),   "block"),
    "park":    ("green space", 110,      (-35, 20, -35),   "oval"),
}


def _random_place(rng: np.random.Generator, size: int, shape: str) -> np.ndarray:
    """A place 2-4 eighths of the tile's side across, on the eighths' grid: a rectangular city block, or an
    oval filling such a rectangle. (size, size) bool."""
    cell = size // 8
    w, h = cell * rng.integers(2, 5, 2)
    x = cell * rng.integers(0, 8 - w // cell + 1)
    y = cell * rng.integers(0, 8 - h // cell + 1)
    yy, xx = np.mgrid[:size, :size]
    inside = (xx >= x) & (xx < x + w) & (yy >= y) & (yy < y + h)
    if shape == "oval":
        inside &= ((xx + 0.5 - x - w / 2) / (w / 2)) ** 2 + ((yy + 0.5 - y - h / 2) / (h / 2)) ** 2 <= 1
    return inside


def _map_background(size: int) -> np.ndarray:
    """The map's position cue: red grows left to right, green top to bottom. (size, size, 3) uint8."""
    yy, xx = np.mgrid[:size, :size]
    gradient = np.stack([80 + 150 * xx / size, 80 + 150 * yy / size, np.full(xx.shape, 200.0)], -1)
    return gradient.astype(np.uint8)


def make_synthetic_sample(rng: np.random.Generator, size: int = 224, kinds: int = 2):
    """One (sat, map, mask, text) tile pair. Places never overlap, so the mask is exactly the target's."""
    map_pixels = _map_background(size)
    # the ground: grey urban speckle in 4 x 4-pixel grains of 8 levels (coarse, to keep data_sample/ small)
    grains = 115.0 + 5 * rng.integers(-4, 4, ((size + 3) // 4, (size + 3) // 4, 1))
    sat = np.repeat(np.repeat(grains, 4, axis=0), 4, axis=1)[:size, :size].repeat(3, axis=2)
    taken = np.zeros((size, size), bool)
    chosen = list(PLACE_KINDS) if kinds == 2 else [list(PLACE_KINDS)[rng.integers(len(PLACE_KINDS))]]
    places = []                                                         # (kind, (H, W) bool)
    for kind in chosen:
        for _attempt in range(50):
            region = _random_place(rng, size, PLACE_KINDS[kind][3])
            grown = ndimage.binary_dilation(region, iterations=4)
            if not (grown & taken).any():
                taken |= grown
                places.append((kind, region))
                break
    if len(places) < len(chosen):                                       # rare: no room left; try again
        return make_synthetic_sample(rng, size, kinds)
    for kind, region in places:
        _, blue, tint, _ = PLACE_KINDS[kind]
        sat[region] += tint            # a place's ground differs in colour: what the segmenter grows into
        map_pixels[region, 2] = blue   # the gradient stays in red and green: the place's own position
    map_img = Image.fromarray(map_pixels)
    kind, mask = places[rng.integers(len(places))]
    text = kind if rng.random() < 0.5 else PLACE_KINDS[kind][0]
    return Image.fromarray(sat.clip(0, 255).astype(np.uint8)), map_img, mask, text


def target_alone(text: str, sat: Image.Image, map_img: Image.Image):
    """The tiles with every place but the target taken away (the map's block painted over with the
    background, the satellite's tint removed): the warm-up's one-kind curriculum. -> (sat, map) or None."""
    named = other_kind(text, map_img)
    if named is None:
        return None
    region = named[1]
    kind = next(kind for kind, (function, *_) in PLACE_KINDS.items() if named[0] in (kind, function))
    ground = np.asarray(sat, dtype=np.int16).copy()
    ground[region] -= PLACE_KINDS[kind][2]                 # exact: the tint never pushed a value past 0-255
    plain = np.asarray(map_img).copy()
    plain[region] = _map_background(plain.shape[0])[region]
    return Image.fromarray(ground.astype(np.uint8)), Image.fromarray(plain)


def other_kind(text: str, map_img: Image.Image):
    """The tile's other kind of place: (its name, in the same form as `text`, and its mask, read off the
    map's blue), or None when the text names no kind of ours or the map shows no other kind."""
    names = [(kind, function) for kind, (function, *_) in PLACE_KINDS.items()]
    form = next((i for pair in names for i, name in enumerate(pair) if name == text), None)
    if form is None:
        return None
    pixels = np.asarray(map_img.convert("RGB"))
    for kind, function in names:
        mask = pixels[..., 2] == PLACE_KINDS[kind][1]
        if text not in (kind, function) and mask.any():
            return (kind, function)[form], mask
    return None


def make_synthetic_data(out: str | Path, n_train: int = DATA_SAMPLE_SIZES[0],
                        n_val: int = DATA_SAMPLE_SIZES[1], size: int = 224, seed: int = 0, kinds: int = 2):
    """Write train/ and val/ splits of synthetic tiles in the SocioSeg raw-file layout."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            sat, map_img, mask, text = make_synthetic_sample(rng, size, kinds)
            d = Path(out) / split / f"{split}_{i:04d}"
            d.mkdir(parents=True, exist_ok=True)
            sat.save(d / "sat.png"); map_img.save(d / "map.png")
            Image.fromarray((mask * 255).astype(np.uint8)).save(d / "mask.png")
            (d / "question.json").write_text(json.dumps({"problem": text}) + "\n", encoding="utf-8")
