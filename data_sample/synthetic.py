"""Synthetic SocioSeg-style tiles: the generator of data_sample/ (socioreasoner.py make-data runs it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

DATA_SAMPLE_SIZES = (256, 32)       # train, val tiles in data_sample/

# ============================================================================================================
# Appendix — synthetic SocioSeg-style tiles (data_sample/)
# ============================================================================================================
# SocioSeg itself cannot be downloaded on every machine, and tests must never download anything, so the
# project ships a few tiles made by this seeded generator in the raw-file layout. Each tile holds places of
# different kinds. The digital map shows each place as a flat area in its kind's colour with a darker icon
# dot at its centre (the way a web map shows an area of interest); the satellite image shows the ground: a
# texture per kind over a noisy urban background, crossed by roads. The target text names one kind present
# in the tile, as a class ("school") or a function ("educational"); the mask is that place.
#
# Why the map's background is a colour gradient (red grows left to right, green top to bottom). Qwen2.5-VL
# has no absolute position embedding: where an image token lies enters only through rotary positions inside
# attention. A pretrained model has learnt to turn that into "this is the top-left corner"; a random tiny
# one has not, so what it reads from a token says *what* is there, never *where*, and it cannot answer a box.
# Measured: without a position cue in the images the tiny model stayed at the blind baseline after 1,000+
# supervised steps, even with one square per tile; with the gradient it localises within a few hundred. The
# gradient is the demo's stand-in for the position sense pretraining gives: each map pixel carries its own
# coordinates as colour, and the vision tower mixes neighbouring patches, so a place's tokens learn where they
# are. Real SocioSeg maps need no such thing. Blank tiles (the report's control) remove it with everything else.
#
# kinds_per_tile: 1 gives one place per tile (the text names its kind; the model only has to find it), 2 gives
# two places of different kinds (the text decides which one is the target).
# Regenerate data_sample/ with:  python socioreasoner.py make-data --out data_sample

PLACE_KINDS = {
    # class     function        map colour        icon            ground colour     ground texture
    "school":  ("educational", (250, 150, 40),  (170, 80, 10),  (160, 95, 75),   "track"),
    "park":    ("green space", (40, 170, 60),   (10, 90, 25),   (70, 125, 60),   "trees"),
}


def _random_block(rng: np.random.Generator, size: int, notch: bool = True) -> np.ndarray:
    """A place as a city block: a rectangle 18%-45% of the tile's side across, with one corner cut away (so
    its box covers more than the place, and stage 2 has something to refine). (size, size) bool."""
    w, h = (rng.uniform(0.18, 0.45, 2) * size).astype(int)
    x, y = rng.integers(0, size - w), rng.integers(0, size - h)
    block = np.zeros((size, size), bool)
    block[y:y + h, x:x + w] = True
    if notch:
        nw, nh = (rng.uniform(0.3, 0.5, 2) * (w, h)).astype(int)
        nx, ny = (x, x + w - nw)[rng.integers(2)], (y, y + h - nh)[rng.integers(2)]
        block[ny:ny + nh, nx:nx + nw] = False
    return block


def make_synthetic_sample(rng: np.random.Generator, size: int = 224, kinds_per_tile: int = 2):
    """One (sat, map, mask, text) tile pair. Places never overlap, so the mask is exactly the target's."""
    yy, xx = np.mgrid[:size, :size]
    # the ground: a smooth, tile-specific urban colour field (smooth also keeps the PNGs small)
    base = rng.uniform(100, 140, 3)
    wave = np.sin(xx / rng.uniform(9, 20) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(9, 20))
    sat = base[None, None] + 10 * wave[..., None]
    gradient = np.stack([80 + 150 * xx / size, 80 + 150 * yy / size, np.full(xx.shape, 200.0)], -1)
    map_img = Image.fromarray(gradient.astype(np.uint8))
    map_draw = ImageDraw.Draw(map_img)
    for _ in range(rng.integers(1, 3)):                                 # roads: white on the map, dark below
        horizontal, at, w = rng.random() < 0.5, rng.integers(0, size), int(rng.integers(3, 6))
        line = [(0, at), (size, at)] if horizontal else [(at, 0), (at, size)]
        road = Image.new("L", (size, size))
        ImageDraw.Draw(road).line(line, fill=255, width=w)
        sat[np.asarray(road) > 0] = (60, 60, 62)
    taken = np.zeros((size, size), bool)
    places = []                                                         # (kind, (H, W) bool)
    for kind in rng.permutation(list(PLACE_KINDS))[:kinds_per_tile]:
        for _attempt in range(50):
            region = _random_block(rng, size)
            grown = ndimage.binary_dilation(region, iterations=4)
            if not (grown & taken).any():
                taken |= grown
                places.append((str(kind), region))
                break
    if len(places) < kinds_per_tile:                                    # rare: no room left; try again
        return make_synthetic_sample(rng, size, kinds_per_tile)
    for kind, region in places:
        _, fill, icon, ground, texture = PLACE_KINDS[kind]
        look = np.asarray(ground, float)[None, None] + 6 * wave[..., None]
        if texture == "trees":                                          # dark blobs of canopy
            look -= 30 * (np.sin(xx / 2.5) * np.sin(yy / 2.5) > 0.5)[..., None]
        elif texture == "track":                                        # bright track lines
            look += 45 * ((yy // 3) % 4 == 0)[..., None]
        sat[region] = look[region]
        map_draw.bitmap((0, 0), Image.fromarray(region.astype(np.uint8) * 255).convert("1"), fill=fill)
    kind, mask = places[rng.integers(len(places))]
    text = kind if rng.random() < 0.5 else PLACE_KINDS[kind][0]
    return Image.fromarray(sat.clip(0, 255).astype(np.uint8)), map_img, mask, text


def make_synthetic_data(out: str | Path, n_train: int = DATA_SAMPLE_SIZES[0], n_val: int = DATA_SAMPLE_SIZES[1],
                        size: int = 224, seed: int = 0, kinds_per_tile: int = 2):
    """Write train/ and val/ splits of synthetic tiles in the SocioSeg raw-file layout."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            sat, map_img, mask, text = make_synthetic_sample(rng, size, kinds_per_tile)
            d = Path(out) / split / f"{split}_{i:04d}"
            d.mkdir(parents=True, exist_ok=True)
            sat.save(d / "sat.png"); map_img.save(d / "map.png")
            Image.fromarray((mask * 255).astype(np.uint8)).save(d / "mask.png")
            (d / "question.json").write_text(json.dumps({"problem": text}) + "\n", encoding="utf-8")

