"""SocioReasoner in one file: urban socio-semantic segmentation with vision-language reasoning.

A reference implementation of "Urban Socio-Semantic Segmentation with Vision-Language Reasoning" (Wang et
al.), to be read beside the paper. A VLM sees a digital map and a satellite image of the same place and a
target ("school", "a certain university", "educational"). Stage 1: it reasons and answers boxes; SAM turns
them into a coarse mask, drawn with the boxes onto both images. Stage 2: it looks at its own drawing and
answers boxes with points inside them; SAM turns those into the final mask. Nothing in this chain is
differentiable, so one shared policy is trained with GRPO on rewards computed from the ground truth.

The sections follow the paper and the path of a sample, from the hyperparameters (A.2.3) and the data (§3)
to the metrics (§5.1); then appendices A-G for what serves the method: the offline demo, SFT, the training
run, held-out report, eval and infer, benchmark, synthetic data, and the command line.

Conventions. A box is [x1, y1, x2, y2] in continuous pixel coordinates: pixel (row r, column c) covers
[c, c+1) x [r, r+1). The *mask frame* is the tiles' pixels as stored (SAM and the ground truth live there),
the *model frame* the tiles' pixels as the Qwen2.5-VL processor resized them (the model reads and writes
numbers there); `to_frame` alone converts. Shapes: B rows (prompt x completion), T completion tokens, G
completions per prompt, H x W mask pixels.
"""
from __future__ import annotations

import argparse, contextlib, dataclasses, functools, io, json, math, os, re, shlex, shutil, string, sys, time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Protocol

# torch's idle threads busy-wait by default and fight any other process on shared cores (README, Threads);
# OpenMP reads OMP_WAIT_POLICY when torch is imported, so it is set here (a user's value wins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

# ==== A.2.3 — hyperparameters ===============================================================================
# Every field is a flag (appendix G) of the commands named in its `takes`; a command's other fields keep
# their defaults. `sft` is `train` without GRPO steps; `bench` times training steps.
EVERY = "train sft bench infer eval"
TRAINING = "train sft bench"
GRPO = "train bench"
RUN = "train sft"
INFERENCE = "infer eval"

def param(default, doc, takes=TRAINING, **docs):
    """A field, its flag's --help line (docs: another line for a command) and the commands taking it."""
    return field(default=default, metadata={"doc": doc, "takes": takes.split(), "docs": docs})

@dataclass
class Config:
    model: str = param("Qwen/Qwen2.5-VL-3B-Instruct", "the policy (for training, the start): hub id, local "
                       "folder such as runs/NAME/checkpoint, 'tiny' (random weights) or 'random-3b' "
                       "(Qwen2.5-VL-3B's architecture, random weights, for timing)", EVERY)
    sam: str = param("facebook/sam2-hiera-large", "SAM 2 (frozen): hub id, local .pt checkpoint, 'tiny' "
                     "(random weights), 'random-large' (SAM 2 large, random weights) or 'grow' (a "
                     "weights-free stand-in)", EVERY)
    sam_config: str = param("configs/sam2/sam2_hiera_l.yaml", "sam2 config used with a local .pt checkpoint",
                            EVERY)
    prompts: str = param("", "JSON file replacing our prompt wording: keys stage1, stage2, single (any of "
                         "them); placeholders {target} (required), {w} {h} (model-frame size), and in stage2 "
                         "{boxes} or {boxes_json}; literal braces doubled", EVERY)
    data: str = param("data_sample", "SocioSeg root: <data>/<split>/<id>/{sat,map,mask}.png + question.json, "
                      "or <split>-*.parquet shards below it", TRAINING + " eval")
    split: str = param("train", "split to train on")
    out: str = param("runs/train", "run folder: checkpoint/, log.jsonl (and warmup/, eval.json)",
                     RUN + " infer eval",
                     infer="folder for mask.png (the final mask, the tile's size), overlay.png (both stages)",
                     eval="folder for metrics.json and masks/<id>.png (and pictures/ with --pictures)")
    steps: int = param(250, "RL steps T of Algorithm 1", GRPO)
    rollout_batch: int = param(128, "prompts per RL step (the paper's rollout batch)", GRPO)
    group_size: int = param(8, "G: completions sampled per prompt and stage", GRPO)
    lr: float = param(1e-6, "AdamW learning rate", GRPO)
    clip_eps: float = param(0.5, "PPO clip epsilon of eq. 6 (the authors' config uses 0.2)", GRPO)
    kl_beta: float = param(0.005, "KL weight beta of eq. 6", GRPO)
    temperature: float = param(1.0, "sampling temperature of the rollouts; scored logits are divided by it",
                               GRPO)
    rollout_top_p: float = param(1.0, "nucleus of the rollouts' sampling (1 = off; the authors' release: "
                                 "0.99); eq. 6 scores the whole distribution", GRPO)
    rollout_top_k: int = param(0, "top-k of the rollouts' sampling (0 = off; the authors' release: 100)",
                               GRPO)
    max_new_tokens: int = param(512, "cap on completion length; a cut-off answer fails the format gate",
                                EVERY)
    select: str = param("argmax", "Alg. 1 line 15: rollout carried to stage 2: 'argmax' or 'sample' ~exp(R1)",
                        GRPO)
    points_mu: float = param(2.0, "mu of the stage-2 point-count reward, eq. 11 (Table 3 ablates 1, 2, 3)",
                             GRPO)
    single_stage: bool = param(False, "ablation 'w/o reflection' (Table 2): boxes and points in one answer",
                               EVERY)
    stage1_only: bool = param(False, "ablation 'w/o refinement' (Table 2): infer/eval stop after stage 1",
                              INFERENCE)
    shade_map: bool = param(True, "stage 2's drawing (eq. 3) shades the coarse mask on the map as on the "
                            "satellite tile; --no-shade-map draws only the boxes on the map, leaving its "
                            "colours as they are (the demo's map carries position in them)", EVERY)
    micro_batch: int = param(4, "rows (prompt x completion) per forward/backward; gradients are accumulated")
    generation_batch: int = param(64, "sequences (prompts x G) per generate call, whole prompts; 0 = all at "
                                  "once. infer/eval: tiles per batch (KV cache: README, Performance)", EVERY)
    shared_prompt: bool = param(True, "GRPO computes each group's prompt once, in generation (one prefill, "
                                "its KV cache repeated G times) and scoring (one packed sequence per group); "
                                "this flag turns that off: one row per completion, the same numbers", GRPO)
    grad_checkpointing: bool = param(False, "recompute activations in backward: less memory, ~30% slower")
    freeze_vision: bool = param(False, "train the language model only; the vision tower stays as loaded")
    sft_steps: int = param(0, "supervised steps before GRPO (0 = none); the sft command's length")
    sft_lr: float = param(1e-5, "AdamW learning rate of the supervised steps (not given in the paper)")
    sft_lr_end: float = param(1.0, "the supervised lr at the last step, as a fraction of --sft-lr: a cosine "
                              "from 1 to it (1 = constant)")
    sft_batch: int = param(8, "samples per supervised step, each giving a stage-1 and a stage-2 example")
    sft_points: int = param(3, "points per ground-truth region in stage-2 targets (A.2.3: three)")
    sft_curriculum: int = param(0, "synthetic two-kind tiles: ask every tile about both of its places (twice "
                                "the rows), the first N supervised steps with the place asked about alone on "
                                "it (0 = no curriculum)")
    sft_stage1_only: int = param(0, "the first N supervised steps train stage 1 alone (half the rows)")
    eval_split: str = param("", "after training, compare warm-up and trained policy on this split ('' = no)",
                            RUN)
    eval_limit: int = param(0, "evaluate at most this many samples (0 = all)", RUN)
    eval_passes: int = param(1, "sampled passes over --eval-split after training, averaged; every row of the "
                             "report draws with the same seeds", RUN)
    infer_temperature: float = param(1.0, "inference sampling temperature (the authors' release)", INFERENCE)
    infer_top_p: float = param(0.8, "inference nucleus sampling", INFERENCE)
    infer_top_k: int = param(100, "inference top-k sampling", INFERENCE)
    seed: int = param(0, "seeds data order, sampling and the tiny models", EVERY)
    save_every: int = param(10, "write a checkpoint every N steps (and at the end of each phase)", RUN)
    skip_bad: bool = param(False, "leave broken samples out with a warning, rather than stop before training",
                           TRAINING + " eval")
    resume: bool = param(False, "continue from <out>/checkpoint", RUN)

class SocioError(Exception):
    """A problem the user can fix (a bad file, a missing model): the command line prints it as one line."""

# ==== §3, A.1.1 — SocioSeg data =============================================================================
# A sample: a satellite tile I_s, a digital-map tile I_m of the same place (pixel-aligned, same size), the
# binary mask M* of the target and the target text t. Stored as <root>/<split>/<id>/{sat,map,mask}.png +
# question.json {"problem": t} (the released raw files) or as the Hugging Face export's parquet shards
# (columns id, problem, sat_image, map_image, mask_label); no tile size is assumed. A split of 7,620 tiles
# does not fit in memory decoded: listing only *checks* every sample, `read_sample` decodes one when needed.
# (Parquet rows keep their PNGs in memory, ~9 GB for train: prefer the raw files.)

@dataclass
class SampleRef:
    id: str
    text: str
    sat: Any                          # a file path, or encoded bytes from a parquet row; so are map and mask
    map: Any
    mask: Any
    size: tuple = (0, 0)              # (W, H), read from the headers while listing

@dataclass
class Sample:
    id: str
    text: str
    sat: Image.Image                  # RGB, W x H
    map: Image.Image                  # RGB, W x H, pixel-aligned with sat
    mask: np.ndarray                  # (H, W) bool, the ground truth M*

def one_line(e: Exception, limit: Optional[int] = 200) -> str:
    text = " ".join(str(e).split())[:limit]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__

def open_image(source, what: str, sample_id: Optional[str] = None, mode: Optional[str] = None) -> Image.Image:
    """A path or encoded bytes as an image, decoded to `mode`; with no mode only verified (the whole file is
    read: truncation, bad checksums), which leaves its size but no pixels. A broken file is one SocioError."""
    name = f"{what} bytes" if isinstance(source, bytes) else source
    where = f"sample {sample_id}: " if sample_id else ""
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        if mode:
            return image.convert(mode)        # truncated pixel data only shows up when decoding
        image.verify()
        return image
    except Exception as e:  # FileNotFoundError, UnidentifiedImageError, truncated data, a bad checksum, ...
        raise SocioError(f"{where}cannot read {what} image {name}: {one_line(e)}") from None

def list_split(root: str | Path, split: str, need_foreground: bool = False, skip_bad: bool = False) -> list:
    """Every usable sample of a split. All files are read here, so that a broken sample stops a run before
    training, not at step 180; all are reported together, a line each (skip_bad: left out with a warning).
    need_foreground: a mask without a target pixel is broken too (training needs something to find)."""
    root = Path(root)
    problems = []
    raw = (root / split).is_dir()
    if not raw and not any(root.glob(f"**/{split}-*.parquet")):
        raise SocioError(f"no split '{split}' under {root}: expected {root}/{split}/<id>/ folders "
                         f"or {split}-*.parquet shards")
    listed = _list_raw(root / split, problems) if raw else _list_parquet(root, split, problems)
    checked = [(ref, check_sample(ref, need_foreground)) for ref in listed]
    problems += [problem for _, problem in checked if problem]
    if problems and not skip_bad:
        raise SocioError(f"{len(problems)} broken sample(s) in {root}/{split} (--skip-bad leaves them out):"
                         + "".join("\n  " + problem for problem in problems))
    for problem in problems:
        print(f"warning: skipping {problem}", file=sys.stderr)
    if not any(problem is None for _, problem in checked):
        raise SocioError(f"split '{split}' under {root} holds no usable samples")
    return [ref for ref, problem in checked if problem is None]

def check_sample(ref: SampleRef, need_foreground: bool) -> Optional[str]:
    """None if the sample is usable, else one line saying what is wrong with which file. Sets ref.size."""
    try:
        sizes = {what: open_image(getattr(ref, what), what, ref.id).size for what in ("sat", "map", "mask")}
        if len(set(sizes.values())) != 1:
            return f"sample {ref.id}: image sizes disagree (W x H): " + ", ".join(
                f"{what} {w}x{h}" for what, (w, h) in sizes.items())
        ref.size = sizes["sat"]
        if need_foreground and not np.asarray(open_image(ref.mask, "mask", ref.id, "L")).any():
            mask = ref.mask if isinstance(ref.mask, str) else "(parquet bytes)"
            return f"sample {ref.id}: mask {mask} has no foreground pixel"
    except SocioError as e:
        return str(e)

def _list_raw(split_dir: Path, problems: list, text: Optional[str] = None) -> list:
    """The samples <id>/ of a folder, with the target of their question.json (or `text` for all)."""
    refs = []
    for d in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        try:
            target = text or json.loads((d / "question.json").read_text(encoding="utf-8"))["problem"]
            if not isinstance(target, str) or not target.strip():
                raise ValueError("'problem' is not a non-empty string")
            refs.append(SampleRef(d.name, target.strip(), str(d / "sat.png"), str(d / "map.png"),
                                  str(d / "mask.png")))
        except Exception as e:
            problems.append(f"sample {d.name}: cannot read the target from {d / 'question.json'}: "
                            f"{one_line(e)}")
    return refs

def _list_parquet(root: Path, split: str, problems: list) -> list:
    try:
        import pyarrow.parquet as pq  # optional: only the parquet export needs it
    except ImportError:
        raise SocioError("reading SocioSeg parquet shards needs pyarrow: pip install pyarrow "
                         "(or use the raw-file layout <root>/<split>/<id>/...)") from None
    refs = []
    for shard in sorted(root.glob(f"**/{split}-*.parquet")):
        for row in pq.read_table(shard).to_pylist():
            cells = [row[key] for key in ("sat_image", "map_image", "mask_label")]
            images = [c.get("bytes") if isinstance(c, dict) else c for c in cells]      # cells: {bytes, path}
            if isinstance(row["problem"], str) and row["problem"].strip():
                refs.append(SampleRef(str(row["id"]), row["problem"].strip(), *images))
            else:
                problems.append(f"sample {row['id']} in {shard}: 'problem' is not a non-empty string")
    return refs

def read_sample(ref: SampleRef) -> Sample:
    """Decode one sample. The mask is foreground wherever its grayscale value is > 0."""
    sat = open_image(ref.sat, "sat", ref.id, "RGB")
    map_tile = open_image(ref.map, "map", ref.id, "RGB")
    mask = np.asarray(open_image(ref.mask, "mask", ref.id, "L")) > 0
    return Sample(ref.id, ref.text, sat, map_tile, mask)

EIGHT = np.ones((3, 3), dtype=int)          # 8-connectivity: diagonal neighbours belong to the same region

def mask_to_boxes(mask: np.ndarray) -> np.ndarray:
    """Ground-truth boxes B*: one box per 8-connected component of the mask. (H, W) bool -> (J, 4) float."""
    labels, _ = ndimage.label(mask, structure=EIGHT)
    boxes = [[sx.start, sy.start, sx.stop, sy.stop] for sy, sx in ndimage.find_objects(labels)]
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)

# ==== §4.1, eqs. (1) and (4) — prompts and the coordinate frames ============================================
# The model input is [map image, satellite image, text], map first (as in the released data pipeline).
# Qwen2.5-VL reads and writes coordinates as absolute pixels of the image *as its processor resized it*
# (a "smart resize" to multiples of 28 within a pixel budget), so the prompt states that frame's size, and
# every number the model writes is converted to the mask frame before SAM or the rewards see it. (The
# authors' release compares ground-truth boxes in mask pixels with predictions in the resized frame without
# converting either: at 768 px tiles resized to 756 px the error is small enough to hide.)

_SEEN = ("The first image is a digital map and the second a satellite image of the same place; both are "
         "{w}x{h} pixels and aligned pixel for pixel. Target: \"{target}\".\n")
_FIND = ("Use the map's labels, colours and icons together with what the ground looks like to find every "
         "area that is the target. ")
_WITH_POINTS = ("<think>...</think><answer>[{{\"bbox_2d\": [x1, y1, x2, y2], \"points\": [[x, y], [x, y]]}}]"
                "</answer>")
STAGE1_PROMPT = (_SEEN + _FIND + "Reason step by step inside <think></think>, then write the answer inside "
                 "<answer></answer> as a JSON list with one object per area, boxes in pixels of the images:\n"
                 "<think>...</think><answer>[{{\"bbox_2d\": [x1, y1, x2, y2]}}]</answer>")
STAGE2_PROMPT = (_SEEN + "A first attempt is drawn on both images: its boxes are outlined in yellow and the "
                 "mask it produced is shaded red. Its boxes were: {boxes}.\nCheck the drawing against the "
                 "map and the ground. Keep, move or drop boxes, and inside each box give points that lie on "
                 "the target, where the shaded mask misses it or spills over it. Reason step by step inside "
                 "<think></think>, then answer inside <answer></answer>:\n" + _WITH_POINTS)
# The "w/o reflection" ablation (§5.3, Table 2): boxes and points in one answer to one prompt, no rendering.
SINGLE_PROMPT = (_SEEN + _FIND + "For each area give its box and points that lie on it. Reason step by step "
                 "inside <think></think>, then answer inside <answer></answer>:\n" + _WITH_POINTS)
DEFAULT_PROMPTS = {"stage1": STAGE1_PROMPT, "stage2": STAGE2_PROMPT, "single": SINGLE_PROMPT}

# --prompts FILE (a JSON object with any of the keys above) runs a checkpoint in the wording it was trained
# with, e.g. the released SocioReasoner-3B in its authors'. Templates are format strings (literal braces
# doubled); {w} {h} may give the model frame's size; each key requires one placeholder of each set below:
# {boxes} is [[x1, y1, x2, y2], ...] and {boxes_json} [{"bbox_2d": [x1, y1, x2, y2]}, ...], stage 1's boxes.
PROMPT_REQUIRED = {"stage1": [{"target"}], "stage2": [{"target"}, {"boxes", "boxes_json"}],
                   "single": [{"target"}]}

def load_prompts(path: str = "") -> dict:
    """Our templates, with those of the JSON file at `path` (checked here) in their place."""
    try:
        given = json.loads(Path(path).read_text(encoding="utf-8")) if path else {}
    except (OSError, ValueError) as e:
        raise SocioError(f"--prompts {path}: cannot read it as JSON ({one_line(e)})") from None
    if not isinstance(given, dict):
        raise SocioError(f"--prompts {path}: expected a JSON object with keys {', '.join(DEFAULT_PROMPTS)}")
    problems = [problem for key, template in given.items() if (problem := template_problem(key, template))]
    if problems:
        raise SocioError(f"--prompts {path}: " + "; ".join(problems))
    return {**DEFAULT_PROMPTS, **given}

def template_problem(key: str, template) -> Optional[str]:
    """What is wrong with one template of a prompts file; None: nothing."""
    braces = "literal braces are written {{ }}"
    if key not in PROMPT_REQUIRED:
        return f"unknown key '{key}' (known: {', '.join(DEFAULT_PROMPTS)})"
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except (ValueError, TypeError, AttributeError) as e:   # a lone brace; not a string
        return f"{key}: not a format string ({one_line(e)}; {braces})"
    known = {"w", "h"}.union(*PROMPT_REQUIRED[key])
    if names - known:
        return f"{key}: unknown placeholder(s) {braced(names - known)} (known: {braced(known)}; {braces})"
    missing = [braced(group, " or ") for group in PROMPT_REQUIRED[key] if not names & group]
    return f"{key}: missing placeholder {' and '.join(missing)}" if missing else None

def braced(names: set, sep: str = " ") -> str:
    return sep.join(f"{{{n}}}" for n in sorted(names))

def to_frame(coords: np.ndarray, src_hw: tuple, dst_hw: tuple) -> np.ndarray:
    """x/y coordinates from one frame to the other (mask <-> model). coords (..., 2k), x and y alternating:
    boxes (K, 4) or points (N, 2). Box edges and points (pixel (r, c)'s centre is (c + 0.5, r + 0.5)) are
    continuous, so a plain ratio maps them exactly."""
    ratios = np.divide(dst_hw, src_hw)[::-1]                               # (x, y): (W'/W, H'/H)
    return np.asarray(coords, dtype=np.float64) * np.tile(ratios, np.shape(coords)[-1] // 2)

# ==== A.2.2 — parsing the answer; the binary format gate R_form =============================================
# R_form = 1 iff the whole completion is <think>...</think><answer>JSON</answer> and the JSON is a list of
# objects with exactly the stage's keys: stage 1 {"bbox_2d": [x1, y1, x2, y2]}, stage 2 {"bbox_2d": [...],
# "points": [[x, y], ...]}. The precise rules, because RL finds every loophole: numbers are finite ints or
# floats (JSON's NaN/Infinity and booleans are not); a box has x1 < x2 and y1 < y2 (where it lies is not
# judged: SAM's prompts are clipped to the image); an empty list is valid ("nothing here"), more than
# MAX_OBJECTS objects or MAX_POINTS points in a group are not; a completion cut off by max_new_tokens has no
# </answer> and fails. (The authors' release gives partial credit per well-formed item; the paper does not.)

MAX_OBJECTS = 32
MAX_POINTS = 16
ANSWER_RE = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)

def _numbers(values, n: int) -> list:
    """A JSON list of n finite numbers (a boolean is none: type(True) is bool) as floats; else ValueError."""
    if not isinstance(values, list) or len(values) != n or any(type(v) not in (int, float) for v in values):
        raise ValueError(f"not a list of {n} numbers")
    values = [float(v) for v in values]
    if not all(map(math.isfinite, values)):
        raise ValueError("not finite")
    return values

def parse_answer(completion: str, stage: int) -> Optional[list[dict]]:
    """A completion as [{"bbox_2d": [4 floats], ("points": [[x, y], ...])}], or None (R_form = 0). Never
    raises, whatever the text: that is what an RL policy will eventually write."""
    m = ANSWER_RE.fullmatch(completion) if isinstance(completion, str) and len(completion) < 100_001 else None
    keys = {"bbox_2d"} if stage == 1 else {"bbox_2d", "points"}
    parsed = []
    try:    # ValueError: bad JSON or numbers; RecursionError: absurd nesting; OverflowError: huge ints
        items = json.loads(m.group(2)) if m else None     # NaN/Infinity parse here; _numbers rejects them
        if not (isinstance(items, list) and len(items) <= MAX_OBJECTS and all(
                isinstance(item, dict) and set(item) == keys for item in items)):
            return None
        for item in items:
            box = _numbers(item["bbox_2d"], 4)                                  # [x1, y1, x2, y2]
            points = item["points"] if stage == 2 else []
            if not (box[0] < box[2] and box[1] < box[3]) or not isinstance(points, list) \
                    or len(points) > MAX_POINTS:
                return None
            parsed.append({"bbox_2d": box, "points": [_numbers(p, 2) for p in points]} if stage == 2 else
                          {"bbox_2d": box})
    except (ValueError, RecursionError, OverflowError):
        return None
    return parsed

# ==== §4.1, eq. (3) — the renderer D ========================================================================
# Stage 2 needs visual feedback: the stage-1 boxes and the coarse mask M_c drawn onto *both* tiles, so the
# model can compare its attempt with the map's labels and the ground. Drawing happens in the mask frame on
# the stored tiles; the processor then resizes the drawing like any other input.

MASK_RGB = (255, 0, 0)
BOX_RGB = (255, 230, 0)
POINT_RGB = (0, 200, 255)

def render(image: Image.Image, boxes: np.ndarray, mask: Optional[np.ndarray],
           points: Optional[list] = None, alpha: float = 0.4) -> Image.Image:
    """D(I, B, M): `mask` shaded red, `boxes` (K, 4) outlined, `points` [(n, 2)] as dots (only in the
    inference picture); all in the image's own (mask) frame."""
    img = np.asarray(image.convert("RGB"), dtype=np.float32)            # (H, W, 3)
    if mask is not None:
        img[mask] = (1 - alpha) * img[mask] + alpha * np.asarray(MASK_RGB, dtype=np.float32)
    out = Image.fromarray(img.round().astype(np.uint8))
    draw = ImageDraw.Draw(out)
    width = max(1, round(min(out.size) / 150))
    for x1, y1, x2, y2 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        # the outline covers the box's edge pixels; a box under one pixel wide is still drawn as one pixel
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=BOX_RGB, width=width)
    r = 2 * width
    for group in points or []:
        for x, y in np.asarray(group, dtype=np.float64).reshape(-1, 2):
            draw.ellipse([x - r, y - r, x + r, y + r], fill=POINT_RGB, outline=(0, 0, 0))
    return out

# ==== §4.1, eqs. (2) and (5) — the segmenter S, and an answer as its prompt =================================
# S is a frozen SAM 2 (A.2.3); it only ever sees the *satellite* tile, in the mask frame. Encoding a tile is
# the expensive part, so it is a call of its own: once per tile and training step, reused for the coarse mask
# and all G final masks (one with encode_batch gets a batch's tiles in one pass: `encode_tiles`). Any
# Segmenter will do: SAM 2 below, GrowSegmenter (appendix A), a box-filling fake in the tests.

class Segmenter(Protocol):
    def encode(self, image: np.ndarray) -> Any: ...         # (H, W, 3) uint8 -> the tile's encoding
    def segment(self, encoding: Any, boxes: np.ndarray, points: Optional[list] = None) -> np.ndarray: ...
    # boxes (K, 4), points None or K arrays (n_k, 2), in the mask frame, never empty -> (H, W) bool

@dataclass
class Sam2Segmenter:
    """S as SAM 2's image predictor. Following the authors' release, each object (a box, plus its points in
    stage 2, all foreground) is one SAM prompt, SAM returns three candidate masks, the highest-scoring is
    kept, and the objects' masks are OR-ed. Objects with as many points go through SAM in one call (padding
    point lists with SAM's "no point" label would change the masks: the decoder attends to the padding)."""
    predictor: Any                                                      # sam2's SAM2ImagePredictor

    def encode(self, image: np.ndarray) -> dict:
        return self.encode_batch([image])[0]

    # sam2's public API segments only the tiles of the last set_image(_batch) call, but a step segments each
    # tile at several moments, other tiles encoded in between (stage 1's M_c, then stage 2's G masks): so each
    # tile's encoding is kept as the predictor's own state (_features, _orig_hw, _is_image_set, _is_batch),
    # private attributes of sam2 1.1.0 (pinned in requirements.txt; a test checks them against set_image's).
    def encode_batch(self, images: list) -> list:
        """One encoder pass over several tiles (any sizes: each is resized to SAM's 1024 px), cut into one
        single-image predictor state per tile, which `segment` puts back (as set_image of that tile would)."""
        self.predictor.set_image_batch([np.array(im) for im in images])   # writable copies for torchvision
        f = self.predictor._features          # image_embed (B, C, h, w), high_res_feats [(B, C_l, h_l, w_l)]
        return [{"_features": {"image_embed": f["image_embed"][i:i + 1],
                               "high_res_feats": [h[i:i + 1] for h in f["high_res_feats"]]},
                 "_orig_hw": [hw], "_is_image_set": True, "_is_batch": False}
                for i, hw in enumerate(self.predictor._orig_hw)]

    @torch.no_grad()
    def segment(self, encoding: dict, boxes: np.ndarray, points: Optional[list] = None) -> np.ndarray:
        vars(self.predictor).update(encoding)                           # the tile's state, back in place
        h, w = encoding["_orig_hw"][0]
        mask = np.zeros((h, w), bool)
        counts = [0] * len(boxes) if points is None else [len(p) for p in points]
        for n in sorted(set(counts)):
            idx = [i for i, c in enumerate(counts) if c == n]
            coords = np.stack([points[i] for i in idx]).astype(np.float32) if n else None      # (k, n, 2)
            labels = np.ones((len(idx), n), np.int32) if n else None           # 1: every point is foreground
            masks, scores, _ = self.predictor.predict(box=boxes[idx].astype(np.float32), point_coords=coords,
                                                      point_labels=labels, multimask_output=True)
            masks = masks.reshape(len(idx), -1, h, w)                                        # (k, 3, H, W)
            best = scores.reshape(len(idx), -1).argmax(axis=1)                               # of 3 candidates
            mask |= (masks[np.arange(len(idx)), best] > 0).any(axis=0)
        return mask

def encode_tiles(segmenter: Segmenter, images: list, chunk: int = 8) -> list:
    """One encoding per tile, `chunk` tiles per encoder pass (bounding its memory) where it can batch."""
    if not hasattr(segmenter, "encode_batch"):
        return [segmenter.encode(im) for im in images]
    encodings = []
    for start in range(0, len(images), chunk):
        encodings += segmenter.encode_batch(images[start:start + chunk])
    return encodings

def clip_prompts(boxes: np.ndarray, points: Optional[list], hw: tuple):
    """Prompts made safe for any segmenter: clipped to an H x W image, boxes with no area left dropped with
    their points. A point outside its box is kept: what it means is the segmenter's business."""
    h, w = hw
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).clip(0, [w, h, w, h])
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if points is not None:
        points = [np.asarray(p, dtype=np.float64).reshape(-1, 2).clip(0, [w - 1, h - 1])
                  for p, k in zip(points, keep) if k]
    return boxes[keep], points

def answer_prompts(answer: Optional[list], model_hw: tuple, mask_hw: tuple):
    """A parsed answer as SAM prompts in the mask frame: boxes (K, 4) and, in stage 2, K point arrays."""
    if not answer:
        return np.zeros((0, 4)), None
    boxes = to_frame(np.reshape([o["bbox_2d"] for o in answer], (-1, 4)), model_hw, mask_hw)      # (K, 4)
    if "points" not in answer[0]:
        return boxes, None
    return boxes, [to_frame(np.reshape(o["points"], (-1, 2)), model_hw, mask_hw) for o in answer]

def segment_answer(segmenter: Segmenter, encoding, answer, model_hw, mask_hw) -> np.ndarray:
    """S(I_s, prompt = answer): eq. 2 for a stage-1 answer, eq. 5 for a stage-2 answer. (H, W) bool."""
    boxes, points = clip_prompts(*answer_prompts(answer, model_hw, mask_hw), mask_hw)
    if len(boxes) == 0:                  # nothing left to segment (SAM 2 cannot be called without a prompt)
        return np.zeros(mask_hw, bool)
    return segmenter.segment(encoding, boxes, points)

RANDOM_SAM = {"tiny": "configs/sam2.1/sam2.1_hiera_t.yaml", "random-large": "configs/sam2/sam2_hiera_l.yaml"}

def load_segmenter(cfg: Config, device: torch.device) -> Segmenter:
    """SAM 2 from the hub or a .pt checkpoint; 'tiny' / 'random-large': SAM 2.1 tiny / SAM 2 large (the
    paper's) with random weights; 'grow': GrowSegmenter."""
    if cfg.sam == "grow":
        return GrowSegmenter()
    import warnings
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    from sam2.build_sam import HF_MODEL_ID_TO_FILENAMES, build_sam2        # hub id -> (config, checkpoint)
    from sam2.sam2_image_predictor import SAM2ImagePredictor
    def build(config: str, checkpoint: Optional[str]) -> Sam2Segmenter:
        return Sam2Segmenter(SAM2ImagePredictor(build_sam2(config, checkpoint, device=str(device))))
    if cfg.sam in RANDOM_SAM:          # random weights: no sense, real plumbing (and real cost)
        torch.manual_seed(cfg.seed)
        return build(RANDOM_SAM[cfg.sam], None)
    def load(cache_only: bool) -> Sam2Segmenter:
        if Path(cfg.sam).is_file():                                     # a checkpoint holding {"model": ...}
            return build(cfg.sam_config, cfg.sam)
        from huggingface_hub import hf_hub_download      # as SAM2ImagePredictor.from_pretrained, cache-only
        if cfg.sam not in HF_MODEL_ID_TO_FILENAMES:
            raise ValueError(f"not one of sam2's hub ids {', '.join(HF_MODEL_ID_TO_FILENAMES)}")
        config, filename = HF_MODEL_ID_TO_FILENAMES[cfg.sam]
        return build(config, hf_hub_download(cfg.sam, filename, local_files_only=cache_only))
    return load_model("SAM 2", cfg.sam, "--sam", load)

# ==== A.2.2, eqs. (7)-(12) — rewards ========================================================================
# Both stages score R = R_form + R_acc + R_len, and R = 0 whenever R_form = 0. The rewards take the answer as
# `parse_answer` returned it (None: malformed), so each completion is parsed once.
#   Stage 1 (eqs. 7-9), K predicted and J ground-truth boxes in the same frame: R_len = exp(-2 |K - J| / J),
#     R_acc = N_m / max(K, J), N_m = matches of a Hungarian assignment on cost 1 - [IoU > 0.5].
#   Stage 2 (eqs. 10-12): R_acc = IoU(M_f, M*) in pixels; R_len = mean over the G' groups of
#     r(n) = exp(-(n - mu)^2 / (2 sigma^2)), n the group's points, mu = 2, sigma = 2.
# Cases the paper leaves open: J = 0 (user data): an empty answer is right (R_acc = 1), any box wrong (0), and
# R_len = exp(-2K); K = 0 < J: R_acc = 0, R_len = exp(-2); no groups (G' = 0): R_len = 0; two empty masks have
# IoU 1, as in the authors' gIoU. The authors' release instead also counts a mean L1 box distance < 10 px in
# the stage-1 cost (cost = 2 - [IoU > 0.5] - [L1 < 10], score (N_m - sum cost) / max(K, J), in [-1, 1]), and
# requires stage-2 boxes to equal stage 1's and every point to lie inside its box.

def box_area(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Areas of the boxes with corners lo (..., 2) and hi (..., 2); 0 where hi < lo."""
    return np.prod(np.clip(hi - lo, 0, None), axis=-1)

def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a (K, 4) with every box in b (J, 4) -> (K, J)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)[:, None, :]      # (K, 1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)[None, :, :]      # (1, J, 4)
    inter = box_area(np.maximum(a[..., :2], b[..., :2]), np.minimum(a[..., 2:], b[..., 2:]))   # (K, J)
    union = box_area(a[..., :2], a[..., 2:]) + box_area(b[..., :2], b[..., 2:]) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)

def hungarian_matches(pred: np.ndarray, gt: np.ndarray, iou_threshold: float = 0.5) -> int:
    """N_m of eq. 7: the most one-to-one pairs with IoU > threshold (linear assignment on 1 - match)."""
    match = (box_iou(pred, gt) > iou_threshold).astype(np.float64)      # (K, J) binary M; K or J may be 0
    rows, cols = linear_sum_assignment(1.0 - match)                     # rectangular is fine
    return int(match[rows, cols].sum())

def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    union = np.count_nonzero(pred | gt)
    return 1.0 if union == 0 else np.count_nonzero(pred & gt) / union

def point_count_score(n: np.ndarray | int, mu: float = 2.0, sigma: float = 2.0) -> np.ndarray:
    """r(n) of eq. 11: a Gaussian in the number of points of one group, 1 at n = mu."""
    return np.exp(-((np.asarray(n, dtype=np.float64) - mu) ** 2) / (2 * sigma ** 2))

def _reward(well_formed: bool, acc: float, length: float) -> dict:
    """R = R_form + R_acc + R_len; a malformed answer (R_form = 0) scores 0 in every part."""
    if not well_formed:
        return {"format": 0.0, "accuracy": 0.0, "length": 0.0, "total": 0.0}
    return {"format": 1.0, "accuracy": float(acc), "length": float(length), "total": float(1 + acc + length)}

def stage1_reward(answer: Optional[list], gt_boxes: np.ndarray) -> dict:
    """R_1 of eq. 9. gt_boxes (J, 4) must be in the frame the model writes in (the model frame)."""
    pred = np.asarray([o["bbox_2d"] for o in answer or []], dtype=np.float64).reshape(-1, 4)   # None: as []
    K, J = len(pred), len(gt_boxes)
    acc = float(K == 0) if J == 0 else hungarian_matches(pred, gt_boxes) / max(K, J)
    return _reward(answer is not None, acc, math.exp(-2 * abs(K - J) / max(J, 1)))

def stage2_reward(answer: Optional[list], pred_mask: np.ndarray, gt_mask: np.ndarray, mu: float = 2.0):
    """R_2 of eq. 12; pred_mask is S's final mask M_f of this answer. mu: Table 3 ablates 1, 2, 3."""
    counts = [len(o["points"]) for o in answer or []]                    # None: scored as [], then gated
    length = float(point_count_score(counts, mu=mu).mean()) if counts else 0.0
    return _reward(answer is not None, mask_iou(pred_mask, gt_mask), length)

# ==== §4.2 — the policy: Qwen2.5-VL, loading, sampling G completions, log-probs of their tokens =============
# One Qwen2.5-VL serves both stages (A.2.1: shared parameters). GRPO must train on the log-probabilities of
# the distribution that was sampled, so: (1) sampling parameters are explicit, as generate() silently merges
# any field left out from the released checkpoint's generation_config (top_k=1, top_p=0.001, temperature 0.1,
# a repetition penalty); training samples the full softmax at the rollout temperature, which is what
# completion_logprobs scores. (2) Vision placeholder tokens (<|image_pad|>, ...) are never sampled nor scored:
# a completion holding one would break the re-scoring forward ("image features and image tokens do not
# match"). (3) Only completion tokens are scored, up to and including the first EOS; never prompt or image.

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

@dataclass
class Policy:
    model: Any                        # Qwen2_5_VLForConditionalGeneration, float32 weights
    processor: Any                    # Qwen2_5_VLProcessor
    eos_ids: list                     # a completion ends at the first of these (<|im_end|>, <|endoftext|>)
    pad_id: int
    vision_ids: list                  # never sampled, never scored
    device: torch.device
    prompts: dict = field(default_factory=load_prompts)   # the wording it is asked in (see DEFAULT_PROMPTS)

def make_policy(model, processor, device, prompts: str = "") -> Policy:
    tok = processor.tokenizer
    def ids(names: list) -> list:
        return [i for i in tok.convert_tokens_to_ids(names) if i not in (None, tok.unk_token_id)]
    eos = model.generation_config.eos_token_id                  # an id, a list of ids, or None
    eos_ids = set(ids(["<|im_end|>", "<|endoftext|>"])) | set(eos if isinstance(eos, list) else [eos])
    eos_ids = sorted(eos_ids - {None})
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos_ids[0]
    return Policy(model.to(device).eval(), processor, eos_ids, pad, ids(VISION_TOKENS), device,
                  load_prompts(prompts))

# A hub id is downloaded once into the hub's cache (~/.cache/huggingface/hub or $HF_HOME). With no connection
# huggingface_hub retries each file for minutes; instead the hub is asked once, with a 10 s timeout, and if
# it does not answer only the cache is read (as with HF_HUB_OFFLINE=1): what is not there fails at once.

@functools.lru_cache(maxsize=None)
def hub_problem() -> Optional[str]:
    """None when the hub answers; else why it cannot be asked (offline mode, or no answer in time)."""
    from huggingface_hub import constants, get_session
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        status = get_session().head(constants.ENDPOINT, timeout=10).status_code
        return None if status < 400 else f"{constants.ENDPOINT} answered HTTP {status}"
    except Exception as e:  # no route, no name resolution, a timeout, a proxy refusing, ...
        return f"no answer from {constants.ENDPOINT}: {one_line(e, None)}"

def load_model(what: str, name: str, flag: str, load):
    """load(cache_only) of a hub id or local path, saying what is loaded from where; a failure is one line
    with the whole reason and the ways to go on."""
    from huggingface_hub import constants
    hub = not Path(name).exists() and re.fullmatch(r"[\w-][\w.-]*(/[\w.-]+)?", name) is not None
    problem = hub_problem() if hub else None
    where = f"the local cache only ({problem})" if problem else \
        f"the Hugging Face hub (downloaded once, then read from {constants.HF_HUB_CACHE})"
    print(f"loading {what} {name} from {where}" if hub else f"loading {what} from {name}", flush=True)
    try:
        return load(problem is not None)
    except Exception as e:
        if hub:
            first = (f"download it where the hub can be reached (this command, or `hf download {name}`), "
                     "then set HF_HUB_OFFLINE=1 to read the cache only; or ")
        else:
            first = "" if Path(name).exists() else "no such file or folder; "
        raise SocioError(f"cannot load {what} '{name}': {one_line(e, None).rstrip('.')}. Ways on: {first}"
                         f"pass {flag} PATH to a local copy, or --tiny for the offline demo") from None

def load_policy(name: str, device: torch.device, seed: int = 0, prompts: str = "") -> Policy:
    """A random policy (RANDOM_MODELS, seeded) or a Qwen2.5-VL checkpoint in float32, asked in the wording of
    the file `prompts`, else of the prompts.json a --prompts run saved beside the checkpoint, else ours."""
    if name in RANDOM_MODELS:
        return build_random_policy(RANDOM_MODELS[name], seed, device, prompts)
    from transformers import AutoModelForImageTextToText as Model, AutoProcessor
    def load(cache_only: bool) -> tuple:
        # use_kernels=False: with the `kernels` package installed (transformers 5.25 requires it), loading
        # swaps layers for Hub kernels, and on a GPU the first .train() fetches them from the Hub (offline:
        # a ValueError at the first SFT or GRPO step). The model's own layers are what the tests pin.
        model = Model.from_pretrained(name, dtype=torch.float32, local_files_only=cache_only,
                                      use_kernels=False)
        return model, AutoProcessor.from_pretrained(name, local_files_only=cache_only)
    saved = Path(name) / "prompts.json"
    if not prompts and saved.is_file():
        prompts = str(saved)
        print(f"  asked in the wording of {saved}")
    return make_policy(*load_model("policy", name, "--model", load), device, prompts)

def model_frame(policy: Policy, image_size: tuple) -> tuple:
    """(H', W') of an image of (W, H) pixels after the processor's smart resize: the model's frame."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    ip = policy.processor.image_processor
    return smart_resize(image_size[1], image_size[0], factor=ip.patch_size * ip.merge_size,
                        min_pixels=ip.size.shortest_edge, max_pixels=ip.size.longest_edge)

def policy_inputs(policy: Policy, images: list, template: str, target: str, **fields) -> tuple:
    """Chat-formatted prompt [map, satellite, text] -> (processor tensors on the CPU, (H', W')). A prompt's
    pixel_values are ~27 MB at 756 px and a Group keeps its prompt for the whole step (128 prompts a stage:
    3.5 GB), so they stay in host memory; whoever runs the model moves what it needs (`on_device`)."""
    model_hw = model_frame(policy, images[0].size)
    text = template.format(w=model_hw[1], h=model_hw[0], target=target, **fields)
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": text}]
    prompt = policy.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)
    inputs = policy.processor(text=[prompt], images=images, return_tensors="pt")
    grid = inputs["image_grid_thw"][0]                                                      # (t, h, w)
    patch = policy.processor.image_processor.patch_size
    if (int(grid[1]) * patch, int(grid[2]) * patch) != model_hw:   # the prompt would state the wrong size
        raise RuntimeError(f"processor resized to {tuple(grid[1:].tolist())} patches, expected {model_hw} px")
    return dict(inputs), model_hw

def on_device(inputs: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in inputs.items()}

def _autocast(device):
    """bf16 matmuls on a GPU; float32 on a CPU, where bf16 is slow and buys nothing."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

@torch.no_grad()
def sample_completions(policy: Policy, prompts: list, n: int, temperature: float, top_p: float, top_k: int,
                       max_new_tokens: int, batch: int = 0, shared_prompt: bool = True) -> list:
    """n sampled completions of each prompt -> per prompt, n LongTensors (T_g,) on the CPU, through the first
    EOS. Decoding a few sequences leaves a GPU idle, so whole prompts are sampled together, at most `batch`
    sequences (prompts x n) per generate call (0 = all; at least one prompt); with one prompt per call this
    is exactly one-prompt-at-a-time sampling. shared_prompt: each prompt is prefilled once for its n samples
    (`generate_samples`); with n = 1 there is nothing to share."""
    per_call = max(1, batch // n if batch else len(prompts))
    completions = []
    options = dict(do_sample=True, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                   top_k=top_k, min_p=None, typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
                   suppress_tokens=policy.vision_ids, eos_token_id=policy.eos_ids, pad_token_id=policy.pad_id)
    for start in range(0, len(prompts), per_call):
        # Left-padded to the longest prompt P, so that every row's next token is at column P. M-RoPE positions
        # skip the padding (get_rope_index reads the attention mask): each prompt is positioned as if alone.
        part = prompts[start:start + per_call]
        P = max(p["input_ids"].shape[1] for p in part)
        def left(key: str, fill: int) -> torch.Tensor:                            # (k, P), left-padded
            return torch.cat([torch.nn.functional.pad(p[key], (P - p[key].shape[1], 0), value=fill)
                              for p in part])
        inputs = {"input_ids": left("input_ids", policy.pad_id), "attention_mask": left("attention_mask", 0),
                  "mm_token_type_ids": left("mm_token_type_ids", 0),                       # (k, P), 0 = text
                  **{k: torch.cat([p[k] for p in part]) for k in ("pixel_values", "image_grid_thw")}}
        inputs = on_device(inputs, policy.device)                   # this call's prompts only, then freed
        with _autocast(policy.device):
            out = generate_samples(policy, inputs, n, shared_prompt and n > 1, options)
        for seq in out[:, P:].cpu():                                          # (k n, T_max), prompt-major
            ends = torch.isin(seq, torch.tensor(policy.eos_ids)).nonzero()
            completions.append(seq[: int(ends[0]) + 1] if len(ends) else seq)   # keep the EOS itself
    return [completions[i * n:(i + 1) * n] for i in range(len(prompts))]

# Shared prompts in generation. generate(num_return_sequences=n) prefills each prompt n times. Here the model
# runs once over the prompts without their last token, with the images, keeping its KV cache; the cache's
# rows are repeated n times, and generate continues from the repeated prompts: it finds their first P-1
# columns cached, feeds only the last prompt token and samples on, without the images (given again, they
# would be inserted a second time). The subtle part is M-RoPE: Qwen2.5-VL keeps per prompt only `rope_deltas`
# (its largest position + 1 minus its length), from which every later position is made; these must be
# repeated like the cache rows, or the positions are another prompt's (logits off by ~1e-2, greedy output
# that can still look right). What is saved is the prefill's compute, not the KV cache's size.
def generate_samples(policy: Policy, inputs: dict, n: int, shared_prompt: bool, options: dict):
    """n samples of each of the k left-padded prompts in inputs (on the device) -> (k n, P + T_max) ids,
    prompt-major (the n samples of prompt 0 first), as generate(num_return_sequences=n) returns them."""
    if not shared_prompt:
        return policy.model.generate(**inputs, num_return_sequences=n, **options)
    head = {k: inputs[k][:, :-1] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}   # (k, P-1)
    vlm = policy.model.model
    cache = vlm(**head, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                use_cache=True).cache                       # the prompt's last token is always text
    cache.batch_repeat_interleave(n)                        # (k, ...) -> (k n, ...), prompt-major
    vlm.rope_deltas = vlm.rope_deltas.repeat_interleave(n, dim=0)                          # (k n, 1)
    repeated = {k: inputs[k].repeat_interleave(n, dim=0) for k in ("input_ids", "attention_mask")}
    return policy.model.generate(**repeated, cache=cache, **options)

def decode(policy: Policy, completion: torch.Tensor) -> str:
    """Text of a completion without its final EOS (special tokens inside are kept, and fail the format)."""
    ids = completion[:-1] if len(completion) and int(completion[-1]) in policy.eos_ids else completion
    return policy.processor.tokenizer.decode(ids, skip_special_tokens=False)

def completion_logprobs(policy: Policy, model, rows: list, temperature: float, shared_prompt: bool = True):
    """log pi(y_t | y_<t, x) of every completion token, from one forward pass over prompts and completions.
    rows: [(prompt inputs, completion ids (T_i,))] -> logp (B, T) float32 and mask (B, T), T = max T_i.
    shared_prompt: the rows of one prompt are packed into one sequence (`packed_hidden`), else each row is
    its prompt + its completion (`plain_hidden`): the same numbers up to float rounding (a test checks)."""
    with _autocast(policy.device):
        hidden, index = (packed_hidden if shared_prompt else plain_hidden)(policy, model, rows)  # (N,D) (B,T)
    # Logits only where a completion token is predicted (no lm_head over the prompts), and in float32
    # outside autocast: under it lm_head returns bf16 logits, already rounded by up to 0.06 at |logit| 16-32
    # before any log-softmax. (The bf16 reference's lm_head is upcast for this: a transient 1.2 GB at 3B.)
    weight = model.get_output_embeddings().weight.float()                        # (V, D)
    logits = torch.nn.functional.linear(hidden[index].float(), weight)          # (B, T, V) float32
    # The sampled distribution: divided by the temperature, vision tokens removed as at sampling time.
    logits = logits / temperature
    logits[..., policy.vision_ids] = float("-inf")
    comps = [c.to(policy.device) for _, c in rows]
    T = index.shape[1]
    targets = torch.stack([right_padded(c, T, policy.pad_id) for c in comps])            # (B, T)
    logp = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)     # (B, T) float32
    lengths = torch.tensor([len(c) for c in comps], device=policy.device)        # (B,)
    mask = (torch.arange(T, device=policy.device)[None, :] < lengths[:, None]).float()   # (B, T)
    return logp * mask, mask

def right_padded(x: torch.Tensor, n: int, fill: int) -> torch.Tensor:
    """x (..., m) padded on the right of its last dimension to (..., n) with `fill`."""
    return torch.nn.functional.pad(x, (0, n - x.shape[-1]), value=fill)

def embed_with_images(model, ids: torch.Tensor, prompts: list) -> torch.Tensor:
    """Token embeddings of ids (S, L) on the device, the image slots of sequence s filled with the features
    of prompts[s]'s tiles. The vision tower runs once, over the distinct tiles of all prompts."""
    device = ids.device
    # Prompts that show the same tiles share their features: the G rows of a group (one prompt object), and
    # in the warm-up a tile asked about each of its two places (two prompts, equal pixels); called once per
    # prompt, the tower took half of a tiny warm-up step. Each image is encoded on its own inside the tower
    # (windows and full attention stay within an image), so one call over the distinct tiles gives each
    # prompt the features its own call would; only the rounding of the tower's weight gradient, summed in
    # another order, differs.
    distinct = []                                       # prompts with distinct tiles, in order of first use
    where = {}                                          # id(prompt inputs) -> index of its tiles in distinct
    for inp in prompts:
        if id(inp) in where:                            # a group's G rows: one object, compared once
            continue
        match = next((k for k, d in enumerate(distinct) if same_images(d, inp)), None)
        if match is None:
            distinct.append(inp)
            match = len(distinct) - 1
        where[id(inp)] = match
    which = [where[id(inp)] for inp in prompts]         # prompts[s] shows the tiles of distinct[which[s]]
    pixels = torch.cat([inp["pixel_values"] for inp in distinct]).to(device)     # (patches, C T P P)
    grids = torch.cat([inp["image_grid_thw"] for inp in distinct]).to(device)    # (images, 3)
    per_image = model.model.get_image_features(pixels, grids, return_dict=True).pooler_output  # [(n_i, D)]
    first = np.cumsum([0] + [len(inp["image_grid_thw"]) for inp in distinct])    # distinct k's first image
    embeds = model.get_input_embeddings()(ids)                                    # (S, L, D)
    scattered = torch.cat([f for k in which for f in per_image[first[k]:first[k + 1]]]).to(embeds.dtype)
    return embeds.masked_scatter((ids == model.config.image_token_id)[..., None], scattered)

def same_images(a: dict, b: dict) -> bool:
    """Whether two prompts' inputs hold the same tiles: equal grids and equal pixels."""
    same_grids = torch.equal(a["image_grid_thw"], b["image_grid_thw"])
    return same_grids and torch.equal(a["pixel_values"], b["pixel_values"])

def plain_hidden(policy: Policy, model, rows: list) -> tuple:
    """One sequence per row, prompt + completion -> last hidden states (B L, D) and index (B, T): where in
    them completion token t of row i is predicted."""
    device = policy.device
    comps = [c.to(device) for _, c in rows]
    P = torch.tensor([inp["input_ids"].shape[1] for inp, _ in rows], device=device)   # (B,) prompt lengths
    Tc = torch.tensor([len(c) for c in comps], device=device)                         # (B,) their completions
    L, T = int((P + Tc).max()), int(Tc.max())
    # 1. Rows are prompt + completion, right-padded: real tokens keep the positions they were sampled at, so
    #    prompts of different lengths share a micro-batch. mm_token_type_ids marks the image tokens, which
    #    get_rope_index gives M-RoPE's (time, height, width) positions; without it all would get 1-D text
    #    positions: the scores of another model than the one that sampled.
    rows_ids = [torch.cat([inp["input_ids"][0].to(device), c]) for (inp, _), c in zip(rows, comps)]
    ids = torch.stack([right_padded(r, L, policy.pad_id) for r in rows_ids])     # (B, L)
    attn = (torch.arange(L, device=device) < (P + Tc)[:, None]).long()           # (B, L)
    mm_types = torch.stack([right_padded(inp["mm_token_type_ids"][0].to(device), L, 0)
                            for inp, _ in rows])                                 # (B, L), 1 = image
    # 2. Vision once per prompt, its features scattered into every row's image slots.
    embeds = embed_with_images(model, ids, [inp for inp, _ in rows])             # (B, L, D)
    # 3. Given embeddings, the model cannot find the image tokens itself: M-RoPE positions come from here.
    grids = torch.cat([inp["image_grid_thw"] for inp, _ in rows]).to(device)      # (2B, 3)
    positions, _ = model.model.get_rope_index(ids, mm_types, image_grid_thw=grids, attention_mask=attn)
    hidden = model.model(inputs_embeds=embeds, attention_mask=attn, position_ids=positions,
                         use_cache=False).last_hidden_state                      # (B, L, D)
    # The hidden state at j predicts token j + 1: completion token t of row i is predicted at P_i - 1 + t.
    # Past a short row's end that index can leave the sequence: the clamp keeps it in, the mask zeroes it.
    t = torch.arange(T, device=device)
    row_start = L * torch.arange(len(rows), device=device)[:, None]              # (B, 1) in the flattened
    index = (P[:, None] - 1 + t[None, :]).clamp(max=L - 1) + row_start
    return hidden.reshape(-1, hidden.shape[-1]), index

# Shared prompts in scoring. Plain rows compute a group's prompt G times; packed, a group is one sequence
# [prompt, completion 1, ..., completion G]: P + G T tokens instead of G (P + T). It is exact because
# attention is causal: a prompt token never sees a completion, and a completion that sees the prompt and its
# own earlier tokens, at the positions it was sampled at, is computed as in its own row. Two things make that
# so, and both are where one goes wrong. (1) The attention mask is 4-D, per query and key
# (`prefix_sharing_mask`), and additive float (0 or the most negative number): eager attention adds the mask
# to its scores, so a bool mask there runs and is wrong (flash-attention kernels take no such mask). (2) The
# positions are explicit: completion token t sits at the prompt's largest M-RoPE position + 1 + t on all
# three axes, wherever it lies in the packed sequence. (A KV cache of the prompt would also be exact, but
# transformers' gradient checkpointing drops a passed-in cache in train mode.) Cost: README, Shared prompts.
def packed_hidden(policy: Policy, model, rows: list) -> tuple:
    """One sequence per distinct prompt (by identity), [prompt, its rows' completions] -> last hidden states
    (S L, D) and index (B, T): where in them completion token t of row i is predicted."""
    members = {}                          # id(prompt inputs) -> its rows' indices, prompts in order of rows
    for i, (inp, _) in enumerate(rows):
        members.setdefault(id(inp), []).append(i)
    prompts = [rows[m[0]][0] for m in members.values()]
    packed = [packed_sequence(model, inp, [rows[i][1] for i in m])
              for inp, m in zip(prompts, members.values())]
    L, T = max(len(p[0]) for p in packed), max(len(c) for _, c in rows)
    ids = torch.stack([right_padded(p[0], L, policy.pad_id) for p in packed]).to(policy.device)    # (S, L)
    segments = torch.stack([right_padded(p[1], L, -1) for p in packed]).to(policy.device)   # (S, L), -1: pad
    positions = torch.stack([right_padded(p[2], L, 0) for p in packed], dim=1).to(policy.device)  # (3, S, L)
    index = torch.zeros(len(rows), T, dtype=torch.long)                 # (B, T); 0 past a row's end (masked)
    for s, (m, p) in enumerate(zip(members.values(), packed)):
        for i, predictors in zip(m, p[3]):
            index[i, :len(predictors)] = predictors + s * L
    embeds = embed_with_images(model, ids, prompts)                               # (S, L, D)
    hidden = model.model(inputs_embeds=embeds, attention_mask=prefix_sharing_mask(segments, embeds.dtype),
                         position_ids=positions, use_cache=False).last_hidden_state      # (S, L, D)
    return hidden.reshape(-1, hidden.shape[-1]), index.to(policy.device)

def packed_sequence(model, prompt: dict, completions: list) -> tuple:
    """[prompt, completion 1, ..., completion m] on the CPU -> ids (L,); segments (L,): 0 on the prompt, j on
    completion j; M-RoPE positions (3, L); per completion (T_j,), where each of its tokens is predicted."""
    P = prompt["input_ids"].shape[1]
    prompt_positions, _ = model.model.get_rope_index(prompt["input_ids"], prompt["mm_token_type_ids"],
                                                     image_grid_thw=prompt["image_grid_thw"])   # (3, 1, P)
    first = prompt_positions.max() + 1                  # where every completion's first token was sampled
    ids = [prompt["input_ids"][0]]
    segments = [torch.zeros(P, dtype=torch.long)]
    positions = [prompt_positions[:, 0]]
    predictors = []
    start = P                                           # where completion j begins in the packed sequence
    for j, c in enumerate(completions, start=1):
        t = torch.arange(len(c))
        ids.append(c.cpu())
        segments.append(torch.full((len(c),), j))
        positions.append((first + t).expand(3, -1))    # as sampled: the same on the three axes
        predicted_at = start - 1 + t                    # token t by completion token t - 1 ...
        predicted_at[:1] = P - 1                        # ... and token 0 by the prompt's last token
        predictors.append(predicted_at)
        start += len(c)
    return torch.cat(ids), torch.cat(segments), torch.cat(positions, dim=1), predictors

def prefix_sharing_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """segments (S, L) -> additive attention mask (S, 1, L, L): query q sees key k <= q if k is a prompt token
    (segment 0) or in q's own segment; else the most negative number of dtype. Padding (-1) is its own
    segment, never seen by a real token; it sees the prompt, so no row of the mask is empty (NaN)."""
    L = segments.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=segments.device).tril()        # (L, L)
    keys, queries = segments[:, None, :], segments[:, :, None]
    seen = causal & ((keys == 0) | (keys == queries))                                   # (S, L, L)
    additive = torch.zeros(seen.shape, dtype=dtype, device=segments.device)
    return additive.masked_fill(~seen, torch.finfo(dtype).min)[:, None]

# ==== §4.2, eq. (6) — GRPO ==================================================================================
# For each prompt x, G completions y^(g) with rewards R^(g). Per completion token t:
#     r_t = pi_theta(y_t | y_<t, x) / pi_old(y_t | y_<t, x)                        (token importance ratio)
#     l_t = -min(r_t A, clip(r_t, 1 - eps, 1 + eps) A) + beta * k3_t
#     k3_t = exp(q_t) - q_t - 1,  q_t = log pi_ref(y_t) - log pi_theta(y_t)         (always >= 0)
# with A = R - mean_g R the group-relative advantage. As a *value* over tokens sampled from pi_theta, k3 is an
# unbiased estimate of KL(pi_theta || pi_ref): that is what the log shows. As a *loss* its expected gradient
# is E[(1 - pi_ref/pi_theta) grad log pi_theta] = grad KL(pi_ref || pi_theta), the forward (mass-covering)
# KL: it pulls pi_theta to keep covering what pi_ref would write.
# Normalisation: eq. 6 sums l_t over a completion's tokens, which makes long answers weigh more; like the
# authors' release we take the token *mean* per completion, then the mean over completions. Eq. 6 also adds
# beta KL(pi_theta || pi_ref) once per input, outside its sums; here (and in the release) beta k3_t is a
# per-token term inside the token mean, so the KL is weighed per token like the surrogate.
# Old policy: each stage is updated once per step, right after sampling, so the completions are scored by
# the weights that sampled them: pi_old = pi_theta (detached), r_t = 1 and the clip never acts (the logged
# clipped fraction is 0); the gradient of r_t A is A grad log pi_theta, REINFORCE with a group baseline. The
# clip bites only when old log-probs are reused by further updates (Algorithm 1 read literally: an update
# per sample, pi_old refreshed per step); grpo_loss takes old_logp so that case is a call away (and tested).
# Truncated rollouts (--rollout-top-p, --rollout-top-k; off by default: the paper samples at temperature 1):
# the completions come from the head of pi_theta, and eq. 6 still scores them under the whole of it, as the
# authors' release does (its rollouts: top-p 0.99, top-k 100; its log-probs: the whole softmax). The update
# then leaves out how the truncation's kept mass moves, and spends the rollouts on what inference samples.
# Why it matters for a small policy: at temperature 1 it writes a malformed answer from its tail now and then
# (the demo's seed 3: 4 % of stage-1 and 7 % of stage-2 rollouts), which scores 0 against its group's ~2.4;
# its advantage, about -2 against +0.3 for each of the other seven, outweighs their IoU differences, and it
# teaches the policy to avoid a tail that inference (top-p 0.8) never samples.

def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """A = R - mean of its group (Alg. 1 lines 12-13). rewards (B*G,), groups contiguous -> (B*G,). The
    authors' release also divides by the group's std + 1e-6, blowing tiny reward differences up to unit
    size; the paper does not, nor do we. An all-equal group gets exactly zero: no gradient from the surrogate
    (the KL term of its completions still pulls towards pi_ref)."""
    r = rewards.float().view(-1, group_size)                             # (B, G)
    adv = r - r.mean(dim=1, keepdim=True)
    adv[r.amax(dim=1) == r.amin(dim=1)] = 0.0         # a float mean of equal numbers can be off by an ulp
    return adv.view(-1)

def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
              advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float, kl_beta: float):
    """Eq. 6 as (loss, stats). logp/old_logp/ref_logp/mask (B, T) float32, advantages (B,); mask is 1 on
    completion tokens up to and including the first EOS."""
    mask = mask.float()                                                  # (B, T)
    adv = advantages.float()[:, None]                                    # (B, 1)
    ratio = torch.exp(logp - old_logp)                                   # (B, T)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    # q > 20: the policy is e^20 (5e8) times less likely than pi_ref to write its own sample. There the clamp
    # holds k3 constant, so such a token's KL term passes no gradient: a cap on one token's pull, set far
    # below float32's overflow of exp (near q = 88). q < 0 needs none: k3 then grows only linearly. (The
    # authors' release clamps q to +-10.)
    q = (ref_logp - logp).clamp(max=20)
    kl = torch.exp(q) - q - 1                                            # (B, T) >= 0
    n_tokens = mask.sum(dim=1).clamp(min=1)                              # (B,)
    loss = (((-surrogate + kl_beta * kl) * mask).sum(dim=1) / n_tokens).mean()   # token mean, then row mean
    with torch.no_grad():
        clipped = ((ratio > 1 + clip_eps) & (adv > 0)) | ((ratio < 1 - clip_eps) & (adv < 0))
        stats = {"kl": ((kl * mask).sum(dim=1) / n_tokens).mean().item(),
                 "clipped": ((clipped.float() * mask).sum() / mask.sum().clamp(min=1)).item()}
    return loss, stats

# ==== Algorithm 1 — the two-stage rollout ===================================================================
# One prompt and its G completions form a Group, which keeps each completion's parsed answer. Stage 1 (lines
# 5-11): G answers with boxes, rewards R_1. Lines 15-18: the answer g* carried forward, its boxes given to SAM
# for the coarse mask M_c, both drawn onto the tiles. Stage 2 (lines 19-24): G answers with boxes and points,
# SAM's final mask per answer, rewards R_2. (Line 9 runs SAM on all G stage-1 answers, but only M_c of g* is
# ever used, so only that one is computed.) The same functions serve inference with G = 1.

@dataclass
class Group:
    stage: int
    inputs: dict                      # one prompt's processor output: input_ids, mm_token_type_ids (1, P);
                                      # the 2 tiles' pixel_values and image_grid_thw (2, 3)
    model_hw: tuple                   # (H', W') of the tiles as the model sees them
    completions: list                 # G x LongTensor (T_g,), through the first EOS
    texts: list                       # G decoded completions
    answers: list                     # G x parse_answer(...) (None = malformed)
    rewards: list = None              # G reward dicts, once computed

def stage1_prompt(policy: Policy, sample: Sample, key: str = "stage1") -> tuple:
    """Eq. 1: x_1 of a sample -> (inputs, model_hw); key "single": the "w/o reflection" ablation's prompt."""
    return policy_inputs(policy, [sample.map, sample.sat], policy.prompts[key], sample.text)

def stage2_inputs(policy: Policy, sample: Sample, boxes_model: np.ndarray, model_hw: tuple,
                  coarse: np.ndarray, shade_map: bool = True) -> dict:
    """Eqs. 3-4, x_2: a first attempt's boxes (K, 4) listed in the model frame, and drawn with its coarse
    mask onto both tiles in the mask frame (the tiles keep their size, so the model frame is stage 1's).
    shade_map False: the map gets the boxes alone (--no-shade-map; the prompt's wording, which says both
    tiles are shaded, is the checkpoint's and stays as it is)."""
    boxes_mask = to_frame(boxes_model, model_hw, sample.mask.shape)
    map_mask = coarse if shade_map else None
    rendered = [render(sample.map, boxes_mask, map_mask), render(sample.sat, boxes_mask, coarse)]
    listed = [[round(float(v), 1) if v % 1 else int(v) for v in b] for b in boxes_model]
    return policy_inputs(policy, rendered, policy.prompts["stage2"], sample.text, boxes=json.dumps(listed),
                         boxes_json=json.dumps([{"bbox_2d": b} for b in listed]))[0]

def stage2_prompt(policy: Policy, sample: Sample, stage1: Group, carried: int, coarse: np.ndarray,
                  shade_map: bool = True) -> tuple:
    """Alg. 1 lines 16-18: x_2 of stage 1's carried answer and its M_c -> (inputs, model_hw). The boxes are
    those the segmenter saw: clipped, empty ones dropped (a box at 1e300 would be spelled out in full)."""
    answer = stage1.answers[carried] or []                                    # a malformed answer: no boxes
    boxes_model = clip_prompts([o["bbox_2d"] for o in answer], None, stage1.model_hw)[0]
    return stage2_inputs(policy, sample, boxes_model, stage1.model_hw, coarse, shade_map), stage1.model_hw

def rollout(policy: Policy, stage: int, prompts: list, n: int, sampling: dict) -> list:
    """n answers to each (inputs, model_hw) prompt, all prompts sampled together -> one Group per prompt."""
    completions = sample_completions(policy, [inputs for inputs, _ in prompts], n, **sampling)
    texts = [[decode(policy, c) for c in comps] for comps in completions]
    return [Group(stage, inputs, hw, comps, ts, [parse_answer(t, stage) for t in ts])
            for (inputs, hw), comps, ts in zip(prompts, completions, texts)]

def select_carried(rewards: list, how: str, rng: np.random.Generator) -> int:
    """Alg. 1 line 15: g* = argmax_g R_1, or g* drawn with probability proportional to exp(R_1)."""
    r = np.asarray(rewards, dtype=np.float64)
    if how == "argmax":
        return int(np.argmax(r))
    p = np.exp(r - r.max())
    return int(rng.choice(len(r), p=p / p.sum()))

# ==== Algorithm 1 — the training step: one GRPO update per stage, on one GPU (or N) =========================
# Algorithm 1 as printed updates inside the loop over a batch's samples (lines 14, 27) and refreshes pi_old
# once per step (line 29); §4.2's schedule and the authors' release update once per stage per step, on the
# whole batch, as here: stage 1 for all samples, one update, stage 2 sampled from the updated policy, one
# update. On a GPU the weights stay float32 (AdamW at lr 1e-6 moves a weight of ~1e-2 by ~1e-6, below bf16's
# resolution there), forward passes run under bf16 autocast, and the frozen reference has bf16 parameters
# (`load_reference`: its log-probs differ by rounding, so the logged KL starts at a small floor). A stage's
# rows (rollout_batch x G) are cut into micro-batches whose gradients are accumulated, each weighted by its
# share of the rows: the full-batch gradient however the batch is cut (a test checks this). A micro-batch
# counts rows, with or without shared prompts (its logits, (rows, T, V) float32, fill memory at 3B); a group
# cut by its edge is packed once in each part.

def accumulate_grpo_gradients(policy: Policy, reference, rows: list, advantages: torch.Tensor,
                              cfg: Config) -> dict:
    """Backward of eq. 6 over rows [(prompt inputs, completion ids)] with advantages (N,), into .grad."""
    stats = {"kl": 0.0, "clipped": 0.0, "loss": 0.0}
    for start in range(0, len(rows), cfg.micro_batch):
        part = rows[start:start + cfg.micro_batch]
        adv = advantages[start:start + cfg.micro_batch]
        with torch.no_grad():                                               # the reference needs no graph
            ref_logp, _ = completion_logprobs(policy, reference, part, cfg.temperature, cfg.shared_prompt)
        logp, mask = completion_logprobs(policy, policy.model, part, cfg.temperature, cfg.shared_prompt)
        # pi_old = the weights that sampled these completions = the current weights (see eq. 6)
        loss, st = grpo_loss(logp, logp.detach(), ref_logp, adv, mask, cfg.clip_eps, cfg.kl_beta)
        share = len(part) / len(rows)
        (loss * share).backward()
        for k, v in {"loss": loss.item(), **st}.items():
            stats[k] += v * share
    return stats

def optimizer_step(policy: Policy, optimizer, what: str, loss: float) -> bool:
    """Apply the accumulated gradient unless it or the loss is not finite: one NaN step would destroy the
    weights (and a NaN loss can come with finite, meaningless gradients: clamp passes no gradient to NaN)."""
    grads = [p.grad for p in policy.model.parameters() if p.grad is not None]
    finite = math.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    if finite:
        optimizer.step()
    else:
        print(f"  {what}: non-finite loss or gradient, update skipped", flush=True)
    optimizer.zero_grad(set_to_none=True)
    return finite

# Data parallel (`torchrun`, appendix G): N processes, each with the whole policy, reference and SAM, take
# contiguous shares of a step's samples (whole groups: advantages are relative to the group) and accumulate
# the gradient of their own rows as above, the mean over those rows. The update needs the mean over all rows:
# each process scales its gradient by its share of the rows, n_r / sum_r n_r, and the scaled gradients are
# summed (all_reduce), parameter by parameter and in place, so that no process holds more than one copy; the
# sum is identical on every process, so their weights stay identical. Unequal shares stay exact (a test
# checks it against one process). Without torchrun these helpers do nothing.

def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1

def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0

def shard(items: list) -> list:
    """This process's contiguous share of a step's samples (all of them alone); shares differ by at most 1."""
    n = len(items)
    return items[rank() * n // world_size():(rank() + 1) * n // world_size()]

def gathered(values: list) -> list:
    """Every process's values (small picklable ones), concatenated in rank order: the whole batch's."""
    if world_size() == 1:
        return values
    parts = [None] * world_size()
    dist.all_gather_object(parts, values)
    return [v for part in parts for v in part]

def combine_gradients(model, stats: dict, n_rows: int) -> dict:
    """The gradients accumulated as means over this process's n_rows rows, and the row-mean statistics
    `stats`, become means over all processes' rows. The loss and gradients are then the same on every process,
    so optimizer_step's finite check agrees everywhere (a NaN on one process reaches all through the sum)."""
    if world_size() == 1:
        return stats
    device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    sums = torch.tensor([n_rows] + [n_rows * v for v in stats.values()], dtype=torch.float64, device=device)
    dist.all_reduce(sums)                                          # (1 + len(stats),): rows, weighted stats
    share = n_rows / float(sums[0])
    for p in model.parameters():
        if p.grad is not None:            # every process ran the same model: the same parameters have one
            p.grad.mul_(share)
            dist.all_reduce(p.grad)       # in place; NCCL/gloo's own buffers only
    return {k: float(s / sums[0]) for k, s in zip(stats, sums[1:])}

def grpo_update(policy: Policy, reference, optimizer, groups: list, cfg: Config) -> dict:
    """Alg. 1 lines 12-14 (or 25-27) for all groups of one stage: advantages, eq. 6, one optimizer step."""
    rows = [(g.inputs, c) for g in groups for c in g.completions]                   # B*G rows
    # on the policy's device: eq. 6 multiplies the advantages, (B*G, 1), with log-probs computed there
    rewards = torch.tensor([r["total"] for g in groups for r in g.rewards], device=policy.device)  # (B*G,)
    advantages = group_advantages(rewards, len(groups[0].completions))               # (B*G,)
    policy.model.train()        # Qwen2.5-VL has no dropout; train mode is what gradient checkpointing needs
    optimizer.zero_grad(set_to_none=True)
    stats = accumulate_grpo_gradients(policy, reference, rows, advantages, cfg)
    stats = combine_gradients(policy.model, stats, len(rows))              # data parallel: the whole batch's
    stats["skipped"] = not optimizer_step(policy, optimizer, f"stage {groups[0].stage}", stats["loss"])
    policy.model.eval()         # back to sampling, with the KV cache
    return stats

def train_step(step: int, batch_refs: list, policy: Policy, reference, optimizer, segmenter: Segmenter,
               cfg: Config) -> dict:
    """Algorithm 1, lines 4-27, for one batch of samples -> the step's mean rewards and update statistics."""
    rng = np.random.default_rng([cfg.seed, step])              # for g* ~ exp(R_1): any step can be replayed
    sampling = dict(temperature=cfg.temperature, top_p=cfg.rollout_top_p, top_k=cfg.rollout_top_k,
                    max_new_tokens=cfg.max_new_tokens, batch=cfg.generation_batch,
                    shared_prompt=cfg.shared_prompt)
    samples = [read_sample(r) for r in batch_refs]
    encodings = encode_tiles(segmenter, [np.asarray(s.sat) for s in samples])   # I_s encoded once per step
    if cfg.single_stage:   # "w/o reflection": one answer with boxes and points, rewarded as in stage 2
        groups = rollout(policy, 2, [stage1_prompt(policy, s, "single") for s in samples], cfg.group_size,
                         sampling)
        reward_stage2(groups, samples, encodings, segmenter, cfg)
        return step_stats({2: (groups, grpo_update(policy, reference, optimizer, groups, cfg))})
    # Stage 1, localisation. Lines 5-8: G completions per sample, parsed
    groups1 = rollout(policy, 1, [stage1_prompt(policy, s) for s in samples], cfg.group_size, sampling)
    for s, g in zip(samples, groups1):                                           # line 10: R_1
        gt_boxes = to_frame(mask_to_boxes(s.mask), s.mask.shape, g.model_hw)     # B* in the model frame
        g.rewards = [stage1_reward(a, gt_boxes) for a in g.answers]
    update1 = grpo_update(policy, reference, optimizer, groups1, cfg)            # lines 12-14
    prompts2 = []
    for s, enc, g in zip(samples, encodings, groups1):
        carried = select_carried([r["total"] for r in g.rewards], cfg.select, rng)                # line 15
        coarse = segment_answer(segmenter, enc, g.answers[carried], g.model_hw, s.mask.shape)    # line 9: M_c
        prompts2.append(stage2_prompt(policy, s, g, carried, coarse, cfg.shade_map))             # lines 16-18
    # Stage 2, refinement, sampled from the updated policy. Lines 19-21: G completions per sample, parsed
    groups2 = rollout(policy, 2, prompts2, cfg.group_size, sampling)
    reward_stage2(groups2, samples, encodings, segmenter, cfg)                   # lines 22-23: M_f, R_2
    update2 = grpo_update(policy, reference, optimizer, groups2, cfg)            # lines 25-27
    return step_stats({1: (groups1, update1), 2: (groups2, update2)})           # line 29: pi_old is pi_theta

def reward_stage2(groups: list, samples: list, encodings: list, segmenter: Segmenter, cfg: Config):
    """Alg. 1 lines 22-23 for every group: S's final mask M_f of each answer, and R_2 of eq. 12."""
    for s, enc, g in zip(samples, encodings, groups):
        masks = [segment_answer(segmenter, enc, a, g.model_hw, s.mask.shape) for a in g.answers]
        g.rewards = [stage2_reward(a, m, s.mask, mu=cfg.points_mu) for a, m in zip(g.answers, masks)]

def step_stats(stages: dict) -> dict:
    """What the log keeps of a step, from {stage: (groups, update statistics)}; of the whole batch when data
    parallel (the update statistics already are: combine_gradients)."""
    stats = {}
    for k, (groups, update) in stages.items():
        rewards = [r for g in groups for r in g.rewards]
        stats[f"reward{k}"] = float(np.mean(gathered([r["total"] for r in rewards])))
        stats[f"format{k}"] = float(np.mean(gathered([r["format"] for r in rewards])))
        stats[f"loss{k}"] = update["loss"]
        if len(stages) > 1:
            stats[f"kl{k}"] = update["kl"]
    # IoU of the well-formed answers only (NaN if none): malformed ones score 0 in every term, and counting
    # those zeros would mix "cannot write" with "cannot find".
    well_formed = gathered([r["accuracy"] for g in stages[2][0] for r in g.rewards if r["format"]])
    stats["iou2"] = float(np.mean(well_formed or [float("nan")]))
    updates = [update for _, update in stages.values()]
    stats["kl"] = sum(u["kl"] for u in updates) / len(updates)
    stats["clipped"] = sum(u["clipped"] for u in updates) / len(updates)
    stats["skipped"] = sum(int(u["skipped"]) for u in updates)
    groups = [g for groups, _ in stages.values() for g in groups]
    stats["tokens"] = sum(gathered([len(c) for g in groups for c in g.completions]))
    return stats

def batch_indices(step: int, n: int, batch: int, seed: int) -> list[int]:
    """Alg. 1 line 3: a step's samples, from a seeded permutation per epoch (recomputable on resume)."""
    positions = range(step * batch, (step + 1) * batch)                 # across epochs, a pass each
    epochs = {pos // n for pos in positions}
    perms = {epoch: np.random.default_rng([seed, epoch]).permutation(n) for epoch in epochs}
    return [int(perms[pos // n][pos % n]) for pos in positions]

# ==== §4.1 — inference: both stages once ====================================================================
# Sampling as in the authors' release (temperature 1.0, top_p 0.8, top_k 100). If the stage-2 answer is
# malformed the coarse stage-1 mask is kept: a usable mask beats an empty one.

@dataclass
class Prediction:
    stages: list                      # [(Group, its mask (H, W) bool)]: stage 1 -> M_c, stage 2 -> M_f
    final: np.ndarray                 # the delivered mask, (H, W) bool
    fallback: bool = False            # the stage-2 answer was malformed and M_c was delivered

def predict_batch(policy: Policy, segmenter: Segmenter, samples: list, cfg: Config,
                  encodings: Optional[list] = None) -> list:
    """Both stages once per sample (or an ablation: one single-stage answer; stage 1 alone), each stage
    sampled for all samples together; with one sample, exactly the one-at-a-time path. encodings: of each
    satellite tile (default: encoded here)."""
    sampling = dict(temperature=cfg.infer_temperature, top_p=cfg.infer_top_p, top_k=cfg.infer_top_k,
                    max_new_tokens=cfg.max_new_tokens, batch=cfg.generation_batch)
    encodings = encodings or encode_tiles(segmenter, [np.asarray(s.sat) for s in samples])
    def mask_of(s: Sample, enc, g: Group) -> np.ndarray:
        return segment_answer(segmenter, enc, g.answers[0], g.model_hw, s.mask.shape)
    key, stage = ("single", 2) if cfg.single_stage else ("stage1", 1)
    groups1 = rollout(policy, stage, [stage1_prompt(policy, s, key) for s in samples], 1, sampling)
    coarse = [mask_of(s, enc, g) for s, enc, g in zip(samples, encodings, groups1)]          # M_c, eq. 2
    if cfg.single_stage or cfg.stage1_only:
        return [Prediction([(g, m)], m) for g, m in zip(groups1, coarse)]
    prompts2 = [stage2_prompt(policy, s, g, 0, m, cfg.shade_map) for s, g, m in zip(samples, groups1, coarse)]
    groups2 = rollout(policy, 2, prompts2, 1, sampling)
    preds = []
    for s, enc, g1, m1, g2 in zip(samples, encodings, groups1, coarse, groups2):
        final = m1 if g2.answers[0] is None else mask_of(s, enc, g2)                        # M_f, eq. 5
        preds.append(Prediction([(g1, m1), (g2, final)], final, fallback=g2.answers[0] is None))
    return preds

# ==== §5.1 — metrics: cIoU, gIoU, F1 ========================================================================
# cIoU: summed intersection over summed union across the split (large regions weigh more). gIoU: mean of
# per-image IoU, an image with empty prediction and empty ground truth counting 1. F1 (instance level): the
# 8-connected components of the ground-truth mask and of the final predicted mask (the mask is what is
# delivered, whatever boxes made it), matched one-to-one by a Hungarian assignment at mask IoU > 0.5, with
# TP, FP and FN summed over the split: F1 = 2 TP / (2 TP + FP + FN). All in percent, as the paper prints them.

def instance_matches(pred: np.ndarray, gt: np.ndarray) -> tuple:
    """(TP, number of predicted instances, number of ground-truth instances) for one image."""
    lp, n_p = ndimage.label(pred, structure=EIGHT)
    lg, n_g = ndimage.label(gt, structure=EIGHT)
    if n_p == 0 or n_g == 0:
        return 0, n_p, n_g
    inter = np.bincount(lp.ravel() * (n_g + 1) + lg.ravel(), minlength=(n_p + 1) * (n_g + 1))
    inter = inter.reshape(n_p + 1, n_g + 1)[1:, 1:]                               # (n_p, n_g) pixels
    area_p, area_g = np.bincount(lp.ravel())[1:], np.bincount(lg.ravel())[1:]
    match = (inter / (area_p[:, None] + area_g[None, :] - inter) > 0.5).astype(float)
    rows, cols = linear_sum_assignment(-match)
    return int(match[rows, cols].sum()), n_p, n_g

def segmentation_metrics(preds: list, gts: list) -> dict:
    if not gts:                              # 0/0: not a perfect score, and no mean of no images
        raise ValueError("no masks to score: the metrics of nothing are undefined")
    inter = []
    union = []
    matches = []                                      # (TP, predicted, ground-truth instances) per image
    for p, g in zip(preds, gts):
        p, g = np.asarray(p, bool), np.asarray(g, bool)
        inter.append(np.count_nonzero(p & g))
        union.append(np.count_nonzero(p | g))
        matches.append(instance_matches(p, g))
    ious = [1.0 if u == 0 else i / u for i, u in zip(inter, union)]
    tp, n_pred, n_gt = (int(n) for n in np.sum(matches, axis=0))
    f1 = 1.0 if n_pred + n_gt == 0 else 2 * tp / (n_pred + n_gt)                # 2TP / (2TP + FP + FN)
    ciou = sum(inter) / sum(union) if sum(union) else 1.0
    return {"cIoU": 100 * ciou, "gIoU": 100 * float(np.mean(ious)), "F1": 100 * f1, "n": len(ious)}

def evaluate(policy: Policy, segmenter: Segmenter, refs: list, cfg: Config, images: str = "real",
             out: Optional[Path] = None, pictures: bool = False) -> dict:
    """Predict every sample, cfg.generation_batch at a time (0 = all): metrics of the final masks, stage 1's
    gIoU, seconds per sample, and "stage2_fallbacks" (malformed stage-2 answers, stage-1 mask kept). out:
    writes <out>/masks/<id>.png (and <out>/pictures/<id>.png), so anyone can recompute the metrics. images:
    what the policy is shown (`shown_to_policy`); the segmenter still gets the real satellite tile."""
    if not refs:
        raise SocioError("nothing to evaluate: no samples given")
    finals = []
    firsts = []
    gts = []
    originals = []
    fallbacks = 0
    seconds = 0.0
    per_batch = cfg.generation_batch or max(1, len(refs))
    for start in range(0, len(refs), per_batch):
        real = [read_sample(r) for r in refs[start:start + per_batch]]
        seen = [shown_to_policy(s, refs[(k + 1) % len(refs)], images) for k, s in enumerate(real, start)]
        t0 = time.time()
        encodings = encode_tiles(segmenter, [np.asarray(s.sat) for s in real])
        preds = predict_batch(policy, segmenter, seen, cfg, encodings)
        seconds += time.time() - t0
        for s, pred in zip(seen, preds) if out is not None else []:
            save_prediction(out, s, pred, pictures)
        finals += [p.final for p in preds]
        firsts += [p.stages[0][1] for p in preds]
        fallbacks += sum(p.fallback for p in preds)
        gts += [s.mask for s in seen]
        originals += [s.mask for s in real]
        if out is not None:   # the eval command shows progress; the report after training stays quiet
            end = "" if len(finals) < len(refs) else "\n"
            print(f"\reval {len(finals)}/{len(refs)}  {seconds / len(finals):.2f} s/sample  "
                  f"ETA {seconds / len(finals) * (len(refs) - len(finals)):.0f}s ", end=end, flush=True)
    metrics = segmentation_metrics(finals, gts)
    metrics["stage1_gIoU"] = segmentation_metrics(firsts, gts)["gIoU"]
    if images == "other kind":            # and the same masks against the tile's own target
        metrics["original_gIoU"] = segmentation_metrics(finals, originals)["gIoU"]
    metrics["seconds_per_sample"] = seconds / len(refs)
    metrics["stage2_fallbacks"] = fallbacks
    return metrics

def save_prediction(out: Path, sample: Sample, pred: Prediction, pictures: bool):
    """<out>/masks/<id>.png, and with pictures <out>/pictures/<id>.png."""
    (out / "masks").mkdir(parents=True, exist_ok=True)
    save_mask(pred.final, out / "masks" / f"{sample.id}.png")
    if pictures:
        (out / "pictures").mkdir(exist_ok=True)
        prediction_picture(sample, pred).save(out / "pictures" / f"{sample.id}.png")

def shown_to_policy(sample: Sample, next_ref: SampleRef, images: str) -> Sample:
    """What the policy is shown of a sample: "real"; "blank" grey tiles; "shuffled" the next sample's tiles
    (so a drop measures what the *policy* reads); "other kind": the same tiles, the text naming the tile's
    other kind of place (synthetic tiles), scored against that place, and against the tile's own target as
    "original_gIoU" (a policy that reads the text misses it)."""
    if images == "blank":
        grey = Image.new("RGB", sample.sat.size, (128, 128, 128))
        return dataclasses.replace(sample, sat=grey, map=grey)
    if images == "shuffled":
        other = read_sample(next_ref)
        return dataclasses.replace(sample, sat=other.sat.resize(sample.sat.size),
                                   map=other.map.resize(sample.sat.size))
    return other_kind_named(sample) if images == "other kind" else sample

def other_kind_named(sample: Sample) -> Sample:
    """The tile with its text naming the other kind of place on it, whose mask becomes the target."""
    named = synthetic().other_kind(sample.text, sample.map)
    if named is None:
        raise SocioError(f"sample {sample.id} is not a tile with two kinds of place (make-data's): there is "
                         "no other kind to name (--sft-curriculum 0 trains without)")
    return dataclasses.replace(sample, text=named[0], mask=named[1])

# ==== Appendix A — the offline demo: a tiny random Qwen2.5-VL and a weights-free stand-in for SAM ===========

@dataclass
class GrowSegmenter:
    """A weights-free S that still answers to its prompts. A box alone gives its rectangle; a box with points
    gives the pixels inside it connected to a point through colours close to that point's (on a smoothed
    tile). A point on the target grows into its shape, one on the background into background: as with SAM,
    stage-2 points can make the mask better or worse than stage 1's boxes, which stage 2 must learn."""
    tolerance: float = 40.0              # colour distance (0-255 RGB) still counted as "the same stuff"

    def encode(self, image: np.ndarray) -> np.ndarray:                     # (H, W, 3) -> smoothed, float
        return ndimage.uniform_filter(np.asarray(image, dtype=np.float32), size=(5, 5, 1))

    def segment(self, encoding: np.ndarray, boxes: np.ndarray, points: Optional[list] = None) -> np.ndarray:
        mask = np.zeros(encoding.shape[:2], bool)
        for k, (x1, y1, x2, y2) in enumerate(np.asarray(boxes).reshape(-1, 4)):
            c1, r1, c2, r2 = int(x1), int(y1), int(math.ceil(x2)), int(math.ceil(y2))
            crop = encoding[r1:r2, c1:c2]
            region = mask[r1:r2, c1:c2]                # a view: writing it writes mask
            pts = [] if points is None else np.asarray(points[k]).reshape(-1, 2)
            inside = [(int(y) - r1, int(x) - c1) for x, y in pts if c1 <= x < c2 and r1 <= y < r2]
            if not inside:                   # no usable point: the box itself
                region[:] = True
            for r, c in inside:              # what is connected to the point through colours close to its own
                near = np.linalg.norm(crop - crop[r, c], axis=-1) < self.tolerance              # (h_k, w_k)
                labels, _ = ndimage.label(near, structure=EIGHT)
                region |= labels == labels[r, c]
        return mask

# The tiny policy: the real classes with toy sizes (112 x 112-pixel model frames, a 4-layer, 128-wide
# language model, a 2-block vision tower, ~1 M parameters): it loads, samples, scores and saves like the 3B
# checkpoint, so every path runs offline. Its tokenizer is byte-level BPE with no merges plus Qwen's special
# tokens and, as a trained vocabulary has for frequent text, single tokens for the answer's syntax, the
# numbers 0-255, our prompts' fixed stretches and the place names: an answer is ~20 tokens, not ~60, and the
# target one token, as in Qwen's vocabulary. `--model random-3b` builds Qwen2.5-VL-3B's published sizes and
# pixel bounds the same way, its vocabulary padded to 151,936 with tokens never produced (so sampling and the
# lm_head cost what they cost the real model): a real-shaped step to time without a download.
TINY_ARCH = dict(
    text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=4096,
              # M-RoPE splits head_dim / 2 = 16 frequency pairs over (time, height, width)
              rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[4, 6, 6])),
    vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                fullatt_block_indexes=[1]),
    vocab_size=0,                                   # 0: the tokenizer's own size
    tie_word_embeddings=False,
    pixels=(56 * 56, 112 * 112))                    # the image processor's min and max pixels per image
QWEN25_VL_3B_ARCH = dict(
    text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
              num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6,
              rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24])),
    vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                fullatt_block_indexes=[7, 15, 23, 31]),
    vocab_size=151936,
    tie_word_embeddings=True,
    pixels=(56 * 56, 28 * 28 * 16384))
RANDOM_MODELS = {"tiny": TINY_ARCH, "random-3b": QWEN25_VL_3B_ARCH}
TINY_CHAT_TEMPLATE = (
    "{%- for m in messages -%}<|im_start|>{{ m['role'] }}\n"
    "{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}{%- for c in m['content'] -%}"
    "{%- if c['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}<|im_end|>\n"
    "{%- endfor -%}{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}")
TINY_PIECES = (["<think>", "</think>", "<answer>", "</answer>", '[{"bbox_2d": [', '{"bbox_2d": [', ", ", "]}",
                '], "points": [[', "], [", "]]}", "school", "educational", "park", "green space"]
               + [str(i) for i in range(256)]
               + [part for prompt in (STAGE1_PROMPT, STAGE2_PROMPT, SINGLE_PROMPT)
                  for part in re.split(r"\{[a-z]+\}", prompt.replace("{{", "{").replace("}}", "}"))
                  if len(part) > 3])

def build_random_policy(arch: dict, seed: int, device: torch.device, prompts: str = "") -> Policy:
    """A Qwen2.5-VL of the sizes in `arch` (TINY_ARCH, QWEN25_VL_3B_ARCH), random weights, our tokenizer."""
    import transformers as hf
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + VISION_TOKENS
    pieces = [bytes_to_unicode()[b] for b in range(256)]
    n_filler = max(0, arch["vocab_size"] - len(pieces) - len(specials) - len(TINY_PIECES))
    pieces += [f"<unused{i}>" for i in range(n_filler)]         # never produced by encoding (no merges)
    vocab = {piece: i for i, piece in enumerate(pieces + specials)}
    tok = hf.Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>",
                            pad_token="<|endoftext|>", extra_special_tokens=specials[1:])
    tok.add_tokens(TINY_PIECES)                     # matched longest-first before the byte-level BPE
    size = {"shortest_edge": arch["pixels"][0], "longest_edge": arch["pixels"][1]}
    processor = hf.Qwen2_5_VLProcessor(image_processor=hf.Qwen2VLImageProcessor(size=size), tokenizer=tok,
                                       video_processor=hf.Qwen2VLVideoProcessor(size=size),
                                       chat_template=TINY_CHAT_TEMPLATE)
    tid = tok.convert_tokens_to_ids
    ids = dict(bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(arch["vision"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112)
    config = hf.Qwen2_5_VLConfig(
        text_config=dict(arch["text"], vocab_size=max(len(tok), arch["vocab_size"]), **ids),
        vision_config=vision, tie_word_embeddings=arch["tie_word_embeddings"],
        image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"))
    torch.manual_seed(seed)
    model = hf.Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = hf.GenerationConfig(**ids)
    # Numbers as a pretrained model knows them: the embeddings (input and output) of the tokens "0".."255"
    # start with a smooth function of their value (sines and cosines, periods 8*pi .. ~8*pi*64), so "57"
    # begins close to "58" and a coordinate a few pixels off is a small mistake, not an unrelated token.
    angle = torch.arange(256.0)[:, None] * (1.0 / 64.0 ** (torch.arange(32.0) / 32)) / 4       # (256, 32)
    code = torch.cat([angle.sin(), angle.cos()], 1)                                              # (256, 64)
    with torch.no_grad():
        for table in (model.get_input_embeddings().weight, model.lm_head.weight):   # (V, D)
            table[tid([str(i) for i in range(256)]), :64] = code * 1.4 * table.std()
    return make_policy(model, processor, device, prompts)

# ==== Appendix B — A.2.3 supervised fine-tuning: the paper's SFT baseline, and the warm-up before GRPO ======
# The SFT baseline (Table 4) trains on answers made from the ground truth: each region's box plus three points
# inside its mask (spread across its middle, `evenly_inside`), in each stage's schema, with an empty
# <think></think> (no reasoning to imitate). A stage-2 prompt needs a first attempt to look at: the
# ground-truth boxes jittered by up to 10% of their size, with
# the segmenter's coarse mask for those, so the model learns to refine rather than copy. The loss is the
# token-mean negative log-likelihood, by GRPO's completion_logprobs. `sft` runs only this phase; `train
# --sft-steps N` runs it first, as a random policy never writes a well-formed answer (every reward and every
# advantage would be 0); the warmed-up policy is then GRPO's KL reference.

def format_answer(items: list) -> str:
    """The answer text of [{"bbox_2d": [...], ("points": [...])}] in whole model pixels; a region narrower
    than one pixel keeps a box one pixel wide (else the target would fail its own format gate)."""
    out = []
    for item in items:
        keys = [key for key in ("bbox_2d", "points") if key in item]
        out.append({key: np.round(item[key]).astype(int).tolist() for key in keys})
        box = out[-1]["bbox_2d"]                             # at least one pixel wide and high
        box[2], box[3] = max(box[2], box[0] + 1), max(box[3], box[1] + 1)
    return f"<think></think><answer>{json.dumps(out)}</answer>"

def sft_examples(policy: Policy, segmenter: Segmenter, sample: Sample, n_points: int,
                 rng: np.random.Generator, single_stage: bool = False, stage1_only: bool = False,
                 shade_map: bool = True) -> list:
    """One sample's supervised rows (prompt inputs, target ids): stage 1 and 2, stage 1 alone, or the
    single-stage one; shade_map: as the stage-2 prompt is drawn (--no-shade-map)."""
    mask_hw = sample.mask.shape
    model_hw = model_frame(policy, sample.sat.size)
    tok = policy.processor.tokenizer                         # a target ends the turn: <|im_end|>, the eos
    def tokens(items: list) -> torch.Tensor:
        return torch.tensor(tok(format_answer(items))["input_ids"] + [tok.eos_token_id])
    boxes_model = to_frame(mask_to_boxes(sample.mask), mask_hw, model_hw)
    if stage1_only:
        return [(stage1_prompt(policy, sample)[0], tokens([{"bbox_2d": b} for b in boxes_model]))]
    labels, n_regions = ndimage.label(sample.mask, structure=EIGHT)    # region j: row j - 1 of mask_to_boxes
    # Candidate points: the model frame's pixel grid (the model writes whole pixels), kept where they land on
    # the region back in the mask frame (a point drawn in the mask frame, then rounded, could fall off a thin
    # region); a region smaller than one model pixel gets the pixel over its centre. n_points per region.
    grid = np.stack(np.meshgrid(np.arange(model_hw[1]), np.arange(model_hw[0])), -1).reshape(-1, 2)  # (N, 2)
    back = to_frame(grid, model_hw, mask_hw).astype(int)                         # (N, 2) mask-frame x, y
    on_label = labels[back[:, 1].clip(0, mask_hw[0] - 1), back[:, 0].clip(0, mask_hw[1] - 1)]   # (N,)
    def centre(j: int) -> np.ndarray:                                        # region j's (x, y), mask frame
        return np.argwhere(labels == j).mean(0)[::-1] + 0.5
    candidates = [grid[on_label == j] if np.any(on_label == j) else        # under one model pixel: its centre
                  np.floor(to_frame([centre(j)], mask_hw, model_hw)) for j in range(1, n_regions + 1)]
    points = [evenly_inside(c, n_points) for c in candidates]
    target2 = tokens([{"bbox_2d": b, "points": p} for b, p in zip(boxes_model, points)])
    if single_stage:       # the paper's SFT baseline proper: one prompt, boxes and points
        return [(stage1_prompt(policy, sample, "single")[0], target2)]
    jitter = rng.uniform(-0.1, 0.1, boxes_model.shape) * np.tile(boxes_model[:, 2:] - boxes_model[:, :2], 2)
    attempt = clip_prompts(np.round(boxes_model + jitter), None, model_hw)[0]        # (K, 4) model frame
    coarse = segment_answer(segmenter, segmenter.encode(np.asarray(sample.sat)),
                            [{"bbox_2d": b} for b in attempt], model_hw, mask_hw)
    return [(stage1_prompt(policy, sample)[0], tokens([{"bbox_2d": b} for b in boxes_model])),
            (stage2_inputs(policy, sample, attempt, model_hw, coarse, shade_map), target2)]

def evenly_inside(candidates: np.ndarray, n: int) -> np.ndarray:
    """n of a region's candidate points (K, 2): those nearest to n spots spread evenly along the line through
    the candidates' centre, at (i + 1) / (n + 1) of their width. Not a random draw: the target is then a
    function of the tile, which the model can learn, and each point sits inside the region, away from the
    edges, where a point grows into the ground around the place (random points: 59 % on the target after a
    demo run, and stage 2 below stage 1)."""
    low = candidates.min(0)
    high = candidates.max(0)
    xs = low[0] + (high[0] - low[0]) * np.arange(1, n + 1) / (n + 1)
    spots = np.stack([xs, np.full(n, candidates[:, 1].mean())], 1)                          # (n, 2)
    nearest = np.linalg.norm(candidates[None] - spots[:, None], axis=-1).argmin(1)         # (n,)
    return candidates[nearest]

def sft_step(policy: Policy, optimizer, rows: list, micro_batch: int) -> float:
    """One supervised update on all rows, accumulated over micro-batches as in GRPO."""
    policy.model.train()
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for part in (rows[start:start + micro_batch] for start in range(0, len(rows), micro_batch)):
        logp, mask = completion_logprobs(policy, policy.model, part, temperature=1.0)
        loss = -((logp * mask).sum(1) / mask.sum(1)).mean()
        (loss * len(part) / len(rows)).backward()
        total += loss.item() * len(part) / len(rows)
    total = combine_gradients(policy.model, {"loss": total}, len(rows))["loss"]     # data parallel: all rows'
    optimizer_step(policy, optimizer, "sft", total)
    policy.model.eval()
    return total

# ==== Appendix C — the training run: phases, log, atomic checkpoints, resume ================================
# A run: an optional SFT warm-up (sft_steps), then GRPO (steps). <out>/checkpoint/ holds the policy and
# processor (save_pretrained) and trainer_state.pt (plain data for torch.load(weights_only=True)): phase,
# step, optimizer and RNG states, the KL reference's source, the config. It is written as checkpoint.tmp/ and
# renamed, the previous one kept as checkpoint.old/ until then: a kill at any moment leaves a complete one. As
# data order and g* are seeded by (seed, step), on a CPU a resumed run repeats the uninterrupted one. Under
# torchrun the processes do the same steps on their shares; rank 0 alone writes files (log, checkpoints,
# warmup/, the held-out report), and each process's rollouts are seeded by (seed, step, rank) at every step,
# so that a resumed data-parallel run needs no saved random state and still repeats exactly on CPUs.

def save_checkpoint(out: Path, policy: Policy, optimizer, state: dict, cfg: Config):
    tmp = out / "checkpoint.tmp"
    final = out / "checkpoint"
    old = out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    save_policy(policy, tmp)
    # The GPU's RNG: only the one in use (get_rng_state_all would open a CUDA context on every visible GPU,
    # and could not be restored on a machine with another number of them).
    cuda = policy.device.type == "cuda"
    torch.save({**state, "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(policy.device) if cuda else None,
                "config": dataclasses.asdict(cfg), "optimizer": optimizer and optimizer.state_dict()},
               tmp / "trainer_state.pt")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)

def save_policy(policy: Policy, folder: Path):
    """Weights, processor and, if not ours, the wording it was trained in: what load_policy reads back."""
    for part in (policy.model, policy.processor):
        part.save_pretrained(folder)
    if policy.prompts != DEFAULT_PROMPTS:
        (folder / "prompts.json").write_text(json.dumps(policy.prompts, indent=1) + "\n", encoding="utf-8")

def latest_checkpoint(out: Path) -> Optional[Path]:
    complete = [d for d in (out / "checkpoint", out / "checkpoint.old") if (d / "trainer_state.pt").exists()]
    return complete[0] if complete else None

def log_lines(path: Path) -> list:
    """The records of a log.jsonl; a line cut off by a kill mid-write is dropped."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records

def prepare_policy(policy: Policy, cfg: Config):
    if cfg.freeze_vision:       # the ViT and its merger stay as loaded; no gradients or AdamW states for them
        policy.model.model.visual.requires_grad_(False)
    if cfg.grad_checkpointing:  # recompute each layer's activations in backward instead of storing them
        policy.model.activation_checkpointing_enable({"use_reentrant": False})   # transformers >= 5.25
        # That call also hooks every input embedding, the ViT's patch embedding too, to make its output
        # require grad (what reentrant checkpointing of frozen embeddings needs; ours is not reentrant): with
        # --freeze-vision the frozen ViT then stays in the graph, recomputed and back-propagated for
        # gradients that nothing uses (at 3B, 2,752 attention backwards per micro-batch). Removed.
        policy.model.disable_input_require_grads()

def new_optimizer(policy: Policy, lr: float) -> torch.optim.Optimizer:
    # No weight decay: the paper gives none, and decay would pull every weight towards 0 on every step.
    return torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=lr, weight_decay=0)

def load_reference(cfg: Config, source: str, device: torch.device):
    """pi_ref, frozen: the run's starting weights ("warmup": this run's <out>/warmup/); on a GPU with bf16
    parameters. Built in host memory (no float32 copy ever on the GPU), then moved to the device."""
    path = str(Path(cfg.out) / "warmup") if source == "warmup" else source
    cpu = torch.device("cpu")
    reference = load_policy(path, cpu, cfg.seed).model.requires_grad_(False)     # its wording is never asked
    # Parameters to bf16, buffers kept: `reference.to(torch.bfloat16)` would also round the rotary inv_freq
    # buffers, which at 3B moves rotary angles by up to 1.73 rad at a token distance of 1,500: another model.
    if device.type == "cuda":
        for p in reference.parameters():
            p.data = p.data.to(torch.bfloat16)
    return reference.to(device)

@dataclass
class Run:                            # what a training run's phases share
    cfg: Config
    state: dict                       # phase ("sft" | "grpo"), steps done in it, where pi_ref comes from
    refs: list                        # the training split
    eval_refs: list                   # held-out samples of the report after training ([] = none)
    policy: Policy
    segmenter: Segmenter
    optimizer: Any
    reference: Any = None             # pi_ref, once the GRPO phase has begun (None: no GRPO steps)

    def checkpoint(self, step: int):
        state = {**self.state, "step": step}                      # step: steps done in this phase
        if rank() == 0:                                           # data parallel: one process writes files,
            save_checkpoint(Path(self.cfg.out), self.policy, self.optimizer, state, self.cfg)
        if world_size() > 1:
            dist.barrier()                                        # and all go on once they are complete

    def log(self, step: int, t0: float, **numbers) -> float:
        """Append to <out>/log.jsonl the record of this phase's step, begun at t0; its seconds."""
        seconds = round(time.time() - t0, 3)
        record = {"phase": self.state["phase"], "step": step, **{k: round(v, 5) for k, v in numbers.items()}}
        if rank() == 0:
            with open(Path(self.cfg.out) / "log.jsonl", "a") as f:
                f.write(json.dumps(record | {"seconds": seconds}) + "\n")
        return seconds

# Fixed for a run's life. The wording (--prompts) travels in the run's folders as prompts.json: a resumed run
# reads it there, never the file it was first given again (which may have changed or gone since).
RUN_FIELDS = ("model", "sam", "sam_config", "seed", "freeze_vision", "sft_points", "prompts")

def resumed_config(saved: dict, cfg: Config, given: Optional[set]) -> Config:
    """--resume: the run's saved config, then the flags given again (given: their names; None: all), but
    RUN_FIELDS stay as saved."""
    again = {k: getattr(cfg, k) for k in (Config.__dataclass_fields__ if given is None else given)}
    return Config(**{**saved, **again, "resume": True, **{k: saved[k] for k in RUN_FIELDS}})

def open_run(cfg: Config, given: Optional[set]) -> Run:
    """A new run in cfg.out, or (--resume) the one there: its config, data, models, optimizer and log."""
    check_config(cfg)
    ckpt = latest_checkpoint(Path(cfg.out))
    if ckpt is not None and not cfg.resume:
        raise SocioError(f"{cfg.out} already holds a checkpoint: continue it with --resume, or choose "
                         "another --out")
    if cfg.resume and ckpt is None:
        raise SocioError(f"--resume: no checkpoint in {cfg.out}")
    state = {"phase": "sft" if cfg.sft_steps else "grpo", "step": 0, "reference": cfg.model}
    saved = None
    if ckpt is not None:
        # map_location: a GPU run's AdamW moments load anywhere; load_state_dict moves them to the weights
        saved = torch.load(ckpt / "trainer_state.pt", weights_only=True, map_location="cpu")
        cfg = resumed_config(saved["config"], cfg, given)
        state = {k: saved[k] for k in state}
        print(f"resuming from {ckpt}: {state['phase']} step {state['step']}")
    refs, eval_refs = run_data(cfg)
    device = pick_device()
    torch.manual_seed(cfg.seed)                      # torch seeds itself at random otherwise
    # resumed: asked in the wording its checkpoint carries (RUN_FIELDS), not a fresh read of --prompts
    policy = load_policy(str(ckpt), device, cfg.seed) if ckpt else load_policy(cfg.model, device, cfg.seed,
                                                                                  cfg.prompts)
    prepare_policy(policy, cfg)
    segmenter = load_segmenter(cfg, device)
    grpo = state["phase"] == "grpo"
    reference = load_reference(cfg, state["reference"], device) if grpo and cfg.steps else None
    if rank() == 0:                                      # data parallel: one process writes the run's files
        Path(cfg.out).mkdir(parents=True, exist_ok=True)     # only once the models have loaded
        restart_log(Path(cfg.out) / "log.jsonl", state if saved else None)
    optimizer = new_optimizer(policy, cfg.lr if grpo else cfg.sft_lr)
    if saved:
        restore(saved, optimizer, device)
    return Run(cfg, state, refs, eval_refs[: cfg.eval_limit or None], policy, segmenter, optimizer, reference)

def run_data(cfg: Config) -> tuple:
    """(the training split, the held-out split or []), every sample checked now."""
    for name in ("rollout_batch", "sft_batch"):            # torchrun: whole samples on every process
        if getattr(cfg, name) < world_size():
            raise SocioError(f"{flag(name)} must be at least the number of processes, {world_size()}")
    refs = list_split(cfg.data, cfg.split, need_foreground=True, skip_bad=cfg.skip_bad)
    try:
        eval_refs = list_split(cfg.data, cfg.eval_split, skip_bad=cfg.skip_bad) if cfg.eval_split else []
    except SocioError as e:
        raise SocioError(f"{e}. --eval-split {cfg.eval_split} (which --tiny sets) evaluates on it after "
                         f"training; --eval-split '' skips that") from None
    return refs, eval_refs

def restore(saved: dict, optimizer, device: torch.device):
    """A checkpoint's AdamW state (the learning rate given now wins) and random draws, which go on once the
    models are built (a tiny one reseeds)."""
    if saved["optimizer"]:
        lr = optimizer.param_groups[0]["lr"]       # new_optimizer's one group
        optimizer.load_state_dict(saved["optimizer"])
        optimizer.param_groups[0]["lr"] = lr
    torch.set_rng_state(saved["torch_rng"])
    if device.type == "cuda" and saved["cuda_rng"] is not None:       # None: saved by a run on a CPU
        torch.cuda.set_rng_state(saved["cuda_rng"], device)

def restart_log(log: Path, state: Optional[dict]):
    """The log keeps its records up to the checkpoint continued from (its state); a new run starts empty."""
    kept = []
    if state:         # (phase is GRPO, step) orders a run: (False, k) < (True, 0), SFT's steps come first
        end = (state["phase"] == "grpo", state["step"])
        kept = [r for r in log_lines(log) if (r["phase"] == "grpo", r["step"]) <= end]
    log.with_suffix(".tmp").write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(log.with_suffix(".tmp"), log)

def warm_up(run: Run):
    """The supervised phase of a run (appendix B); its weights become GRPO's KL reference."""
    cfg = run.cfg
    curriculum = f", asked about both kinds of place, alone for the first {cfg.sft_curriculum} steps"
    print(f"SFT on {len(run.refs)} samples: {cfg.sft_steps} steps x {cfg.sft_batch} samples x "
          f"{1 if cfg.single_stage else 2} stage(s) (stage 1 alone for the first {cfg.sft_stage1_only})"
          f"{curriculum if cfg.sft_curriculum else ''}", flush=True)
    stage1_rows = {}
    for step in range(run.state["step"], cfg.sft_steps):
        t0 = time.time()
        for group in run.optimizer.param_groups:
            group["lr"] = sft_lr_at(cfg, step)
        loss = sft_step(run.policy, run.optimizer, warm_up_rows(run, step, stage1_rows), cfg.micro_batch)
        seconds = run.log(step + 1, t0, loss=loss)
        if (step + 1) % 25 == 0 or step + 1 == cfg.sft_steps:
            print(f"sft  {step + 1:4d}/{cfg.sft_steps}  loss {loss:.4f}  {seconds:.2f}s", flush=True)
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.sft_steps:
            run.checkpoint(step + 1)
    if rank() == 0:
        save_policy(run.policy, Path(cfg.out) / "warmup")
    run.state = {"phase": "grpo", "step": 0, "reference": "warmup"}
    run.optimizer = new_optimizer(run.policy, cfg.lr)
    run.checkpoint(0)                         # (data parallel: warmup/ is written when this returns)
    run.reference = load_reference(cfg, "warmup", run.policy.device) if cfg.steps else None

def sft_lr_at(cfg: Config, step: int) -> float:
    """The supervised lr of a step: a cosine from sft_lr at step 0 to sft_lr * sft_lr_end at sft_steps."""
    cosine = (1 + math.cos(math.pi * step / cfg.sft_steps)) / 2                    # 1 -> 0
    return cfg.sft_lr * (cfg.sft_lr_end + (1 - cfg.sft_lr_end) * cosine)

def warm_up_rows(run: Run, step: int, stage1_rows: dict) -> list:
    """A supervised step's rows: of sft_batch tiles, stage-1 and stage-2 examples (the first sft_stage1_only
    steps stage 1 alone). With a curriculum each tile is asked about both of its places, and for the first
    sft_curriculum steps the place asked about is alone on the tile. stage1_rows: a tile's stage-1-only rows
    by tile index, kept while they stay the same (they draw nothing at random): reading a tile, taking its
    other place away and processing its prompts cost a third of the step that learns from them."""
    cfg = run.cfg
    # Random streams of its own, never those GRPO draws from: the data order of seed + 1 (GRPO's: seed),
    # the points and jitter of (seed, 10**6 + step) (GRPO's g*: (seed, step), step < 10**6); with
    # torchrun, process r > 0 its own: (seed, 10**6 + step, r). Each takes its share of the samples.
    seed = [cfg.seed, 10**6 + step]
    rng = np.random.default_rng(seed + [rank()] if rank() else seed)
    stage1_only = step < cfg.sft_stage1_only and not cfg.single_stage
    alone = step < cfg.sft_curriculum
    rows = []
    for i in shard(batch_indices(step, len(run.refs), cfg.sft_batch, cfg.seed + 1)):
        kept = stage1_rows.get(i)
        if stage1_only and kept is not None and kept[0] == alone:
            rows += kept[1]
            continue
        tile = read_sample(run.refs[i])
        samples = [tile, other_kind_named(tile)] if cfg.sft_curriculum else [tile]
        if alone:
            samples = [target_alone(s) for s in samples]
        tile_rows = []
        for s in samples:
            tile_rows += sft_examples(run.policy, run.segmenter, s, cfg.sft_points, rng, cfg.single_stage,
                                      stage1_only, cfg.shade_map)
        if stage1_only:
            stage1_rows[i] = (alone, tile_rows)
        rows += tile_rows
    return rows

def target_alone(sample: Sample) -> Sample:
    """A synthetic tile with its other kind of place taken away (synthetic.py's target_alone)."""
    tiles = synthetic().target_alone(sample.text, sample.sat, sample.map)
    return dataclasses.replace(sample, sat=tiles[0], map=tiles[1])

def train(cfg: Config, given: Optional[set] = None):
    """Optional SFT warm-up, then T steps of two-stage GRPO (Algorithm 1), logged and checkpointed. given:
    the config fields set on the command line, which a resumed run takes over its saved config (None: all)."""
    run = open_run(cfg, given)
    if run.state["phase"] == "sft":
        warm_up(run)
    cfg = run.cfg
    if run.state["step"] < cfg.steps:
        print(f"GRPO on {len(run.refs)} samples of {cfg.data}/{cfg.split}: {cfg.steps} steps x "
              f"{cfg.rollout_batch} prompts x G={cfg.group_size}, device {run.policy.device}")
    for step in range(run.state["step"], cfg.steps):                                   # Alg. 1 line 2
        t0 = time.time()
        if world_size() > 1:   # each process its own rollouts, seeded per step: a resume needs no saved state
            torch.manual_seed(int(np.random.SeedSequence([cfg.seed, step, rank()]).generate_state(1)[0]))
        batch = shard([run.refs[i] for i in batch_indices(step, len(run.refs), cfg.rollout_batch, cfg.seed)])
        stats = train_step(step, batch, run.policy, run.reference, run.optimizer, run.segmenter, cfg)
        seconds = run.log(step + 1, t0, **stats)
        r1 = f"R1 {stats['reward1']:.3f}  " if "reward1" in stats else ""
        f1 = f"{stats['format1']:.2f}/" if "format1" in stats else ""
        print(f"step {step + 1:4d}/{cfg.steps}  {r1}R2 {stats['reward2']:.3f}  (format {f1}"
              f"{stats['format2']:.2f}, IoU when well-formed {stats['iou2']:.3f})  KL {stats['kl']:.4f}  "
              f"clipped {stats['clipped']:.3f}  {seconds:.1f}s", flush=True)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            run.checkpoint(step + 1)
    print(f"checkpoint in {Path(cfg.out) / 'checkpoint'}, log in {Path(cfg.out) / 'log.jsonl'}")
    if run.eval_refs and rank() == 0:
        run.optimizer = None                                  # AdamW's moments are not needed to evaluate
        # the starting weights, asked in the run's wording (--prompts)
        start = dataclasses.replace(run.policy, model=run.reference) if cfg.steps else None
        held_out_report(cfg, run.refs, run.eval_refs, run.policy, start, run.segmenter)

# ==== Appendix D — the held-out report, eval and infer ======================================================

def held_out_report(cfg: Config, train_refs: list, refs: list, policy: Policy, start, segmenter: Segmenter):
    """After training, on held-out tiles: the starting policy (if GRPO ran), the trained one given real, blank
    and shuffled tiles and (tiles with two kinds of place) the text naming the other kind, and a blind
    baseline that always answers the training split's mean (relative) box."""
    trained = "after GRPO" if start is not None else "after SFT"
    rows = {"start of GRPO": evaluate_passes(start, segmenter, refs, cfg)} if start is not None else {}
    rows[trained] = evaluate_passes(policy, segmenter, refs, cfg)
    rows[f"{trained}, blank tiles"] = evaluate_passes(policy, segmenter, refs, cfg, images="blank")
    rows[f"{trained}, shuffled tiles"] = evaluate_passes(policy, segmenter, refs, cfg, images="shuffled")
    relative = [mask_to_boxes(read_sample(r).mask) / np.tile(r.size, 2) for r in train_refs]
    mean_box = np.concatenate(relative).mean(axis=0)                            # (4,) in [0, 1]
    blind, gts, two_kinds = [], [], True
    for s in map(read_sample, refs):      # one read a tile: the blind answer, its target, its kinds of place
        box = (mean_box * np.tile(s.sat.size, 2))[None]                         # (1, 4) mask frame
        blind.append(segmenter.segment(segmenter.encode(np.asarray(s.sat)), box))
        gts.append(s.mask)
        two_kinds = two_kinds and synthetic().other_kind(s.text, s.map) is not None
    if two_kinds:
        rows[f"{trained}, other kind named"] = evaluate_passes(policy, segmenter, refs, cfg,
                                                               images="other kind")
    rows["blind: mean training box"] = segmentation_metrics(blind, gts)
    averaged = f", mean of {cfg.eval_passes} sampled passes" if cfg.eval_passes > 1 else ""
    print(f"\nheld-out {cfg.data}/{cfg.eval_split} ({len(refs)} samples{averaged}), final masks, percent:")
    print(f"{'':30s} {'cIoU':>6s} {'gIoU':>6s} {'F1':>6s}  stage-1 gIoU  stage-2 fallbacks")
    for name, m in rows.items():   # fallbacks: malformed stage-2 answers, whose stage-1 mask was delivered
        s1 = f"{m['stage1_gIoU']:8.1f}{m['stage2_fallbacks']:9d} of {m['n']}" if "stage1_gIoU" in m else ""
        print(f"{name:30s} {m['cIoU']:6.1f} {m['gIoU']:6.1f} {m['F1']:6.1f}  {s1}")
    named = rows.get(f"{trained}, other kind named")
    if named:
        print(f"(other kind named: scored against the other kind's place; against the tile's own target, "
              f"gIoU {named['original_gIoU']:.1f})")
    (Path(cfg.out) / "eval.json").write_text(json.dumps(rows, indent=1) + "\n")

def evaluate_passes(policy: Policy, segmenter: Segmenter, refs: list, cfg: Config, images="real") -> dict:
    """evaluate() cfg.eval_passes times, pass k drawing from seed (cfg.seed, k) whatever the row: the mean of
    each metric, and n and stage2_fallbacks summed over the passes. One sampled pass over 64 tiles moves gIoU
    by several points; with the same draws in every row, rows differ by their policies, not their luck."""
    passes = []
    for k in range(cfg.eval_passes):
        torch.manual_seed(int(np.random.SeedSequence([cfg.seed, k]).generate_state(1)[0]))
        passes.append(evaluate(policy, segmenter, refs, cfg, images=images))
    summed = ("n", "stage2_fallbacks")
    return {key: (sum if key in summed else np.mean)([p[key] for p in passes]) for key in passes[0]}

def random_model_note(cfg: Config, command: str):
    if cfg.model in RANDOM_MODELS:
        print(f"note: --model {cfg.model} is an untrained, random policy: its answers are noise. To try the "
              f"demo's trained policy, run `python socioreasoner.py train --tiny` (writes {DEMO_OUT}/) and "
              f"then `python socioreasoner.py {command} --tiny --model {DEMO_OUT}/checkpoint`",
              file=sys.stderr)

def run_eval(cfg: Config, split: str, limit: int, pictures: bool):
    """The eval command: a Table-1 row for one model on one split, with every predicted mask on disk."""
    check_config(cfg)
    if limit < 0:
        raise SocioError("--limit cannot be negative (0 = all samples)")
    refs = list_split(cfg.data, split, skip_bad=cfg.skip_bad)[: limit or None]
    device = pick_device()
    policy = load_policy(cfg.model, device, cfg.seed, cfg.prompts)
    segmenter = load_segmenter(cfg, device)
    torch.manual_seed(cfg.seed)
    m = evaluate(policy, segmenter, refs, cfg, out=Path(cfg.out), pictures=pictures)
    method = "w/o reflection" if cfg.single_stage else "w/o refinement" if cfg.stage1_only else "two-stage"
    print(f"{'Method':24s} {'cIoU':>6s} {'gIoU':>6s} {'F1':>6s}   ({cfg.data}/{split}, {m['n']} samples)")
    print(f"{method:24s} {m['cIoU']:6.1f} {m['gIoU']:6.1f} {m['F1']:6.1f}")
    print(f"{m['seconds_per_sample']:.2f} s per sample (Table 8); masks in {Path(cfg.out) / 'masks'}")
    if method == "two-stage":
        print(f"stage-2 answer malformed, stage-1 mask kept: {m['stage2_fallbacks']} of {m['n']} samples")
    record = {**m, "model": cfg.model, "sam": cfg.sam, "data": cfg.data, "split": split, "method": method}
    (Path(cfg.out) / "metrics.json").write_text(json.dumps(record, indent=1) + "\n")
    random_model_note(cfg, "eval")

MAX_TARGET_CHARS = 200      # SocioSeg's targets are a few words; a page of text is a mistake, not a target

def read_tiles(ref: SampleRef) -> Sample:
    """A SampleRef's two tiles (no ground truth needed); unreadable or misaligned tiles are one line."""
    sat = open_image(ref.sat, "satellite", mode="RGB")
    map_img = open_image(ref.map, "map", mode="RGB")
    if sat.size != map_img.size:
        raise SocioError(f"{ref.sat} is {sat.size[0]}x{sat.size[1]} but {ref.map} is {map_img.size[0]}x"
                         f"{map_img.size[1]}: the tiles must be pixel-aligned")
    return Sample(ref.id, ref.text, sat, map_img, np.zeros(sat.size[::-1], bool))

def infer_inputs(sat_path: str, map_path: Optional[str], text: Optional[str]) -> tuple:
    """infer's arguments, checked -> (a folder?, SampleRefs): the tiles of a folder DIR [TEXT] (each tile's
    files checked now, decoded batch by batch later), or the one place of SAT MAP TEXT."""
    if Path(sat_path).is_dir() and text is None:
        problems = []
        refs = _list_raw(Path(sat_path), problems, text=map_path)
        problems += [f"sample {r.id}: no {what}.png" for r in refs for what in ("sat", "map")
                     if not Path(getattr(r, what)).is_file()]
        if problems or not refs:
            raise SocioError(f"infer {sat_path}: " + ("\n  ".join(problems) or "no <id>/ tiles inside"))
        return True, refs
    if map_path is None or text is None or Path(sat_path).is_dir():
        raise SocioError("infer takes SAT MAP TEXT (two tiles and the target), or a folder DIR [TEXT]")
    if not text.strip():
        raise SocioError('the target is empty: name what to find, e.g. "school" or "a certain university"')
    if len(text.strip()) > MAX_TARGET_CHARS:
        raise SocioError(f"the target is {len(text.strip()):,} characters long; at most {MAX_TARGET_CHARS} "
                         "are accepted (targets are a few words, e.g. \"school\")")
    return False, [SampleRef("input", text.strip(), sat_path, map_path, None)]

def infer(cfg: Config, sat_path: str, map_path: Optional[str], text: Optional[str]):
    """The infer command. SAT MAP TEXT: both stages' reasoning and answers, <out>/mask.png and overlay.png.
    DIR [TEXT]: <out>/<id>/mask.png and overlay.png of each tile, cfg.generation_batch tiles at a time."""
    check_config(cfg)
    folder, refs = infer_inputs(sat_path, map_path, text)
    n = cfg.generation_batch or len(refs)
    batches = ([read_tiles(r) for r in refs[i:i + n]] for i in range(0, len(refs), n))
    batches = batches if folder else [next(batches)]      # one place: a bad tile stops before the models load
    device = pick_device()
    policy = load_policy(cfg.model, device, cfg.seed, cfg.prompts)
    segmenter = load_segmenter(cfg, device)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    seconds = 0.0
    for samples in batches:
        t0 = time.time()
        preds = predict_batch(policy, segmenter, samples, cfg)
        seconds += time.time() - t0
        for s, pred in zip(samples, preds):
            where = out / s.id if folder else out
            where.mkdir(parents=True, exist_ok=True)
            save_mask(pred.final, where / "mask.png")
            picture = prediction_picture(s, pred)
            picture.save(where / "overlay.png")
            if folder:
                kept = "  (stage 2 malformed: stage-1 mask kept)" if pred.fallback else ""
                print(f"{s.id}: \"{s.text}\"  mask {int(pred.final.sum())} pixels{kept}", flush=True)
            else:
                print_prediction(s, pred, cfg.single_stage)
                print(f"wrote {out / 'mask.png'} ({s.sat.size[0]}x{s.sat.size[1]}) and {out / 'overlay.png'} "
                      f"({picture.size[0]}x{picture.size[1]}) in {seconds:.1f}s")
    if folder:
        print(f"wrote {out}/<id>/mask.png and overlay.png for {len(refs)} tiles, "
              f"{seconds / len(refs):.2f} s per tile")
    random_model_note(cfg, "infer " + shlex.join(a for a in (sat_path, map_path, text) if a is not None))

def print_prediction(s: Sample, pred: Prediction, single_stage: bool):
    """Each stage's reasoning, answer (in the tile's pixels) and mask size."""
    for g, mask in pred.stages:
        print(f"--- {'single stage' if single_stage else f'stage {g.stage}'} ---")
        reasoning = re.search(r"<think>(.*?)</think>", g.texts[0], re.DOTALL)        # the free-form channel
        print("reasoning:", reasoning.group(1).strip() if reasoning else "(none)")
        if g.answers[0] is None:
            print("answer: malformed (format gate failed); raw completion:", repr(g.texts[0][:500]))
        boxes, points = answer_prompts(g.answers[0], g.model_hw, s.mask.shape)
        for i, b in enumerate(boxes):
            pts = "" if points is None else f"  points {np.round(points[i]).astype(int).tolist()}"
            print(f"  box {np.round(b).astype(int).tolist()}{pts}   (satellite-image pixels)")
        print(f"mask: {int(mask.sum())} pixels")
    if pred.fallback:
        print("stage-2 answer malformed: keeping the stage-1 mask")

def save_mask(mask: np.ndarray, path: Path):
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)            # 0 / 255, readable by read_sample

# A row of the picture, by (stage, rows): the two stages, or one of the ablations alone.
STAGE_TITLES = {(1, 2): "stage 1: boxes -> coarse mask", (2, 2): "stage 2: boxes + points -> final mask",
                (1, 1): "stage 1 only (w/o refinement): boxes -> final mask",
                (2, 1): "single stage (w/o reflection): boxes + points -> final mask"}

def prediction_picture(sample: Sample, pred: Prediction, max_side: int = 1024) -> Image.Image:
    """In the spirit of the paper's Fig. 3: the target, a legend, then a row per stage, named, with its boxes,
    points and mask drawn on the map (left) and the satellite tile (right), scaled down past max_side px."""
    scale = min(1.0, max_side / max(sample.sat.size))
    w, h = (max(1, round(v * scale)) for v in sample.sat.size)
    tiles = [t.resize((w, h), Image.BILINEAR) if scale < 1 else t for t in (sample.map, sample.sat)]
    fs = min(28, max(12, w // 16))                                     # font size, line height
    font = ImageFont.load_default(size=fs)
    line = fs + fs // 2
    panel = Image.new("RGB", (2 * w, 2 * line + len(pred.stages) * (line + h)), "white")
    draw = ImageDraw.Draw(panel)
    def text(y, words):                 # at the left edge, cut to the panel's width (never below "...")
        while len(words) > 3 and font.getlength(words) > 2 * w - 8:
            words = words[:-4] + "..."
        draw.text((4, y), words, fill="black", font=font)
    text(2, f'target: "{sample.text}"')
    legend = "left: map, right: satellite;"                             # then the swatches: box, point, mask
    y = line + 2
    text(y, legend)
    x = 4 + font.getlength(legend + " ")
    for name, style in {"box": dict(outline=BOX_RGB, width=max(2, fs // 8)),
                        "point": dict(fill=POINT_RGB, outline=(0, 0, 0)),
                        "mask": dict(fill=tuple(round(0.6 * 255 + 0.4 * c) for c in MASK_RGB))}.items():
        (draw.ellipse if name == "point" else draw.rectangle)([x, y + 2, x + fs, y + fs], **style)
        draw.text((x + fs + 4, y), name, fill="black", font=font)
        x += 2 * fs + 4 + font.getlength(name)
    for row, (group, mask) in enumerate(pred.stages):
        top = 2 * line + row * (line + h)
        title = STAGE_TITLES[group.stage, len(pred.stages)]
        if group.answers[0] is None:
            title += " (malformed; stage-1 mask kept)" if row else " (malformed)"
        text(top + 2, title)
        boxes, points = answer_prompts(group.answers[0], group.model_hw, sample.mask.shape)
        if scale < 1:
            boxes = boxes * scale
            points = None if points is None else [p * scale for p in points]
            mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
        for col, tile in enumerate(tiles):
            panel.paste(render(tile, boxes, mask, points), (col * w, top + line))
    return panel

# ==== Appendix E — benchmark: where a training step's time and memory go ====================================
# `bench` times a few training steps by kind of work, from outside the method (`timed_functions`), counts SAM
# encodings and tokens, and reads peak memory; then times generation alone, one prompt per call against
# --generation-batch; then accumulates one micro-batch 1 and 8 times (peak memory must not grow with it).

BENCH_KINDS = {"sample_completions": "generation", "encode_tiles": "segmentation",
               "segment_answer": "segmentation", "stage1_reward": "rewards", "stage2_reward": "rewards",
               "accumulate_grpo_gradients": "policy forward/backward", "optimizer_step": "optimizer",
               "completion_logprobs": "reference forward"}   # under no_grad: the reference's, taken out below

PAPER_ROWS = 128 * 8           # A.2.3: rollout batch 128 prompts, G = 8 completions each, per stage

def timed_call(fn, *args, **kwargs) -> tuple:
    """(seconds, fn(*args, **kwargs)), waiting before each clock read for the GPU's asynchronous work."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, result

@contextlib.contextmanager
def timed_functions(times: dict, calls: list):
    """While the block runs, the module's functions named in BENCH_KINDS are replaced by wrappers: each adds
    its wall time to times[its kind], and the calls of encode_tiles and sample_completions are listed in calls
    as (name, args, kwargs)."""
    originals = {name: globals()[name] for name in BENCH_KINDS}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            if name in ("encode_tiles", "sample_completions"):        # to count tiles, to replay prompts
                calls.append((name, args, kwargs))
            if BENCH_KINDS[name] == "reference forward" and torch.is_grad_enabled():
                return fn(*args, **kwargs)           # the policy's own forward, within its forward/backward
            seconds, result = timed_call(fn, *args, **kwargs)
            times[BENCH_KINDS[name]] = times.get(BENCH_KINDS[name], 0.0) + seconds
            return result
        return wrapper
    globals().update({name: timed(name, fn) for name, fn in originals.items()})
    try:
        yield
    finally:
        globals().update(originals)

def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with contextlib.suppress(OSError):        # Linux: the process's peak resident memory back to its RSS
        Path("/proc/self/clear_refs").write_text("5")

def peak_memory_mb(device) -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    if Path("/proc/self/status").exists():
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def bench(cfg: Config, steps: int, replays: bool = True):
    """`steps` training steps each way, shared prompts and one row per completion (--no-shared-prompt), in
    alternation (step 1 shared then plain, step 2 plain then shared, ...), so that a drift of the machine's
    speed and whatever memory one leaves behind hit both alike; then (replays) generation and accumulation
    alone."""
    check_config(cfg)
    device = pick_device()
    torch.manual_seed(cfg.seed)
    refs = list_split(cfg.data, cfg.split)
    policy = load_policy(cfg.model, device, cfg.seed, cfg.prompts)
    prepare_policy(policy, cfg)
    reference = load_reference(cfg, cfg.model, device)
    segmenter = load_segmenter(cfg, device)
    optimizer = new_optimizer(policy, cfg.lr)
    print(f"bench: {steps} steps each way x {cfg.rollout_batch} prompts x G={cfg.group_size}, micro-batch "
          f"{cfg.micro_batch}, max {cfg.max_new_tokens} new tokens, device {device}")
    records = {True: [], False: []}                             # shared_prompt -> one record per step
    for step in range(steps):
        batch = [refs[i] for i in batch_indices(step, len(refs), cfg.rollout_batch, cfg.seed)]
        for shared in ((True, False) if step % 2 == 0 else (False, True)):
            # the same seed both ways: the same batch sampled with the same random numbers (the weights
            # differ only by the other way's update of this step)
            torch.manual_seed(cfg.seed * 100_003 + step)
            way = dataclasses.replace(cfg, shared_prompt=shared)
            records[shared].append(bench_step(step, batch, policy, reference, optimizer, segmenter, way))
            way_name = "shared" if shared else "plain "
            print(f"  step {step + 1} {way_name}: {records[shared][-1]['seconds']:.2f}s", flush=True)
    print_bench(records, cfg, device)
    if not replays:
        return
    calls = records[cfg.shared_prompt][-1]["calls"]                 # the last step of the flag's way
    generation = [(args, kwargs) for name, args, kwargs in calls if name == "sample_completions"]
    bench_generation(generation, len(batch), cfg)
    bench_accumulation(policy, reference, optimizer, generation[0], cfg)

def bench_step(step: int, batch: list, policy: Policy, reference, optimizer, segmenter, cfg: Config) -> dict:
    """One timed training step -> seconds by kind of work, SAM encodings, prompt and completion tokens,
    peak memory, and the calls of encode_tiles and sample_completions."""
    times = {}
    calls = []
    reset_peak_memory(policy.device)
    with timed_functions(times, calls):
        seconds, stats = timed_call(train_step, step, batch, policy, reference, optimizer, segmenter, cfg)
    times["policy forward/backward"] -= times.get("reference forward", 0.0)
    times["scoring"] = times["policy forward/backward"] + times.get("reference forward", 0.0)
    prompts = [p for name, args, _ in calls if name == "sample_completions" for p in args[1]]
    return {**stats, **times, "seconds": seconds, "calls": calls, "peak": peak_memory_mb(policy.device),
            "encodings": sum(len(args[1]) for name, args, _ in calls if name == "encode_tiles"),
            "prompt_tokens": float(np.mean([p["input_ids"].shape[1] for p in prompts])),
            "completions": len(prompts) * cfg.group_size}

def print_bench(records: dict, cfg: Config, device):
    """Mean seconds per step by kind of work, shared prompts against one row per completion, the ratio."""
    def mean(shared: bool, key: str) -> float:
        return float(np.mean([r.get(key, 0.0) for r in records[shared]]))
    print(f"\n{'seconds per step':42s} {'shared':>8s} {'plain':>8s} {'ratio':>6s} {'share':>6s}")
    for key in ("generation", "segmentation", "rewards", "policy forward/backward", "reference forward",
                "optimizer", "scoring", "seconds"):
        name = {"scoring": "scoring (policy fwd/bwd + reference fwd)", "seconds": "total (the whole step)"}
        ratio = mean(True, key) / max(mean(False, key), 1e-9)
        print(f"  {name.get(key, key):40s} {mean(True, key):8.3f} {mean(False, key):8.3f} {ratio:6.2f} "
              f"{100 * mean(False, key) / mean(False, 'seconds'):5.1f}%")
    what = "GPU allocated" if device.type == "cuda" else "process RSS"
    peaks = {shared: max(r["peak"] for r in records[shared]) for shared in records}
    print(f"  {'peak memory, MB (' + what + ')':40s} {peaks[True]:8.0f} {peaks[False]:8.0f} "
          f"{peaks[True] / peaks[False]:6.2f}")
    print(f"SAM image encodings per sample per step: {mean(True, 'encodings') / cfg.rollout_batch:.2f}")
    # Every part's work is proportional to the rows (prompts x G) at a fixed --generation-batch and
    # --micro-batch, so a step of the paper's 128 prompts x G 8 costs the same per row; memory does not grow.
    scale = PAPER_ROWS / (cfg.rollout_batch * cfg.group_size)
    for shared in (True, False):
        way = "shared" if shared else "plain"
        tokens = mean(shared, "tokens") / mean(shared, "completions")
        print(f"{way}: prompts of {mean(shared, 'prompt_tokens'):.0f} tokens, completions of {tokens:.1f} "
              f"tokens on average (cap {cfg.max_new_tokens}), "
              f"{mean(shared, 'tokens') / mean(shared, 'generation'):.0f} tokens generated per second")
        seconds = mean(shared, "seconds") * scale
        print(f"{way}, extrapolated to the paper's 128 prompts x G=8 ({scale:.0f}x the rows): "
              f"{seconds:.0f} s per step, {seconds * 250 / 3600:.1f} h for its 250 steps")

def bench_generation(generation: list, n_prompts: int, cfg: Config):
    """Generation alone, with the same weights: a step's sample_completions calls [(args, kwargs)] (both
    stages' prompts) again, one prompt per call (G sequences, how rollouts were sampled before batching)
    against --generation-batch, alternated so that a change of machine load hits both alike; median of 3."""
    def generate(batch: int) -> int:                                          # -> the tokens generated
        tokens = 0
        for args, kwargs in generation:
            completions = sample_completions(*args, **{**kwargs, "batch": batch})
            tokens += sum(len(c) for cs in completions for c in cs)
        return tokens
    runs = {cfg.group_size: [], cfg.generation_batch: []}
    for b in list(runs) * 3:
        runs[b].append(timed_call(generate, b))
    stages = "the single stage" if cfg.single_stage else "both stages"
    print(f"generation alone, {stages} of a step ({n_prompts} prompts x G={cfg.group_size} each), "
          "median of 3:")
    medians = {b: sorted(r)[1] for b, r in runs.items()}
    for b, (s, tokens) in medians.items():
        what = "all prompts in one call" if b == 0 else f"{max(1, b // cfg.group_size)} prompt(s) per call"
        speedup = f"  {medians[cfg.group_size][0] / s:.2f}x" if b != cfg.group_size else ""
        print(f"  --generation-batch {b:<4d} ({what}): {s:.3f} s per step, {tokens / s:,.0f} tokens/s"
              + speedup)

def bench_accumulation(policy: Policy, reference, optimizer, generation_call: tuple, cfg: Config):
    """One micro-batch's rows (the first prompt of a sample_completions call), accumulated once and eight
    times: the peak memory must not grow with the number of micro-batches."""
    (_, prompts, _), sampling = generation_call            # rollout's call: (policy, prompts, n), sampling
    prompt = prompts[0]
    device = policy.device
    completions, = sample_completions(policy, [prompt], cfg.micro_batch, **sampling)
    policy.model.train()
    peaks = {}
    for k in (1, 8):
        rows = [(prompt, c) for c in completions] * k
        optimizer.zero_grad(set_to_none=True)
        reset_peak_memory(device)
        advantages = torch.randn(len(rows), generator=torch.Generator().manual_seed(0)).to(device)
        accumulate_grpo_gradients(policy, reference, rows, advantages, cfg)
        peaks[k] = peak_memory_mb(device)
    print(f"gradient accumulation, micro-batch {cfg.micro_batch}: peak {peaks[1]:.0f} MB with 1 micro-batch, "
          f"{peaks[8]:.0f} MB with 8; ratio {peaks[8] / peaks[1]:.3f}")

# ==== Appendix F — synthetic SocioSeg-style tiles ===========================================================
# data_sample/ holds tiles from a seeded generator beside them, data_sample/synthetic.py (what they show, and
# why, is told there): SocioSeg cannot be downloaded on every machine, and the tests must never download.

@functools.lru_cache(maxsize=None)
def synthetic():
    """The generator module data_sample/synthetic.py (make_synthetic_data, make_synthetic_sample, ...)."""
    import importlib.util
    path = Path(__file__).resolve().parent / "data_sample" / "synthetic.py"
    spec = importlib.util.spec_from_file_location("synthetic", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

# ==== Appendix G — the command line =========================================================================
# Every command's flags are Config's fields that take it (`param`); where a command's values come from is one
# rule: Config's defaults, then the command's, then --tiny's, then the flags given (`sft` is `train` given
# --steps 0). --help costs torch's import (a second or three): the method comes first in this file.

COMMANDS = {
    "train": "two-stage GRPO training (Algorithm 1), after an optional SFT warm-up",
    "sft": "supervised steps only, no GRPO (A.2.3); with --single-stage, the paper's SFT baseline",
    "infer": "segment one place: infer SAT MAP \"school\"; tiles: infer DIR [TEXT]",
    "eval": "cIoU, gIoU, F1 and seconds per sample of a model on a split (Table 1)",
    "bench": "time and memory of a few training steps, by kind of work"}
# --tiny, the offline demo (appendix A: a tiny random Qwen2.5-VL, a weights-free SAM stand-in). Its tiles hold
# a school and a park on a grid; the text names one (data_sample/synthetic.py says why the world is so). A
# random model does not learn to read the text and find a place at once, so the warm-up is a curriculum:
# every tile is asked about both of its places, by name, so that only the text tells the two answers apart
# (without that the text stayed unread: naming the other kind found the same place), and for the first 200
# steps the place asked about is alone on the tile, to find a place before choosing one. Stage-2 rows cost
# about three stage-1 rows, and stage-1-only rows are kept from one visit of a tile to the next, so stage 1
# trains alone until step 550, then both stages for 250. The supervised lr falls on a cosine to half (with a
# constant lr one seed of six never localised; decayed further, GRPO had less to add). Two choices let stage 2
# refine rather than trail stage 1 (README, "What the demo shows"): one point per region (the paper's SFT has
# three), as the stand-in grows every point and one that misses the place grows into the ground; and the
# coarse mask is not shaded on the map, whose colours say where a pixel is (shaded, stage 2 localised worse
# than stage 1). A tiny model's GRPO lr; its rollouts drawn as the authors' release draws them, top-p 0.99 and
# top-k 100 (at eq. 6, why): in whole runs of seeds 0-3 GRPO then added 4.0-9.1 points, against 1.4-7.9. The
# report averages 4 sampled passes over the 64 held-out tiles: one pass moves gIoU by several points (six
# passes of one policy: 43.4 to 55.1), so that a single pass could not tell GRPO's gain from its luck.
TINY_DEFAULTS = dict(model="tiny", sam="grow", rollout_batch=8, group_size=8, max_new_tokens=64,
                     micro_batch=16, lr=3e-5, steps=60, rollout_top_p=0.99, rollout_top_k=100,
                     sft_steps=800, sft_lr=1e-3, sft_lr_end=0.5,
                     sft_batch=8, sft_curriculum=200, sft_stage1_only=550, sft_points=1, shade_map=False,
                     eval_split="val", eval_passes=4, save_every=100, generation_batch=0)
DEMO_OUT = "runs/demo"      # --tiny's out (runs/demo-sft, ... for other commands): never a real run's folder
RELEASED = "vvangfaye/SocioReasoner-3B"                              # the authors' trained policy
COMMAND_DEFAULTS = {"sft": dict(sft_steps=500, out="runs/sft"), "eval": dict(model=RELEASED, out="runs/eval"),
                    "infer": dict(model=RELEASED, out="runs/infer")}

def command_config(command: str, tiny: bool, given: dict) -> Config:
    tiny_values = {**TINY_DEFAULTS, "out": DEMO_OUT if command == "train" else f"{DEMO_OUT}-{command}"}
    return Config(**{**COMMAND_DEFAULTS.get(command, {}), **(tiny_values if tiny else {}), **given})

def flag(name: str) -> str:
    return "--" + name.replace("_", "-")

def shown(value) -> str:
    return "''" if value == "" else str(value)

def given_as(name: str, value) -> str:
    """A value as the command line gives it: --name VALUE, or a switch (--name, --no-name)."""
    if isinstance(value, bool):
        return flag(name if value else "no_" + name)
    return f"{flag(name)} {shown(value)}"

def add_flag(parser: argparse.ArgumentParser, f: dataclasses.Field, command: str):
    """Config field f as a flag of `command`, default None (so that main tells the flags given). A switch
    has both forms, --NAME and --no-NAME, so that a flag given after --tiny can undo either setting."""
    doc = f.metadata["docs"].get(command, f.metadata["doc"]).replace("%", "%%")        # %: for argparse
    if f.type == "bool":
        parser.add_argument(flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                            help=f"{doc} (default {given_as(f.name, f.default)})")
    else:
        default = shown(COMMAND_DEFAULTS.get(command, {}).get(f.name, f.default))
        parser.add_argument(flag(f.name), dest=f.name, type=type(f.default),
                            help=f"{doc} (default {default})")

def tiny_help(command: str) -> str:
    tiny = command_config(command, True, {})                                # the values --tiny gives
    names = [f.name for f in dataclasses.fields(Config) if command in f.metadata["takes"]]
    values = " ".join(given_as(k, getattr(tiny, k)) for k in TINY_DEFAULTS if k in names)
    if "out" in names:
        values += f"; --out {tiny.out}"
    note = "; unless --model is given the policy is random" if command in INFERENCE.split() else ""
    return f"offline demo: {values} (flags given still win){note}"

def add_own_arguments(p: argparse.ArgumentParser, command: str):
    """A command's arguments that are not Config fields."""
    if command == "infer":
        p.add_argument("sat", help="satellite tile (PNG/JPEG), or a folder DIR of <id>/{sat,map}.png tiles")
        p.add_argument("map", nargs="?",
                       help="digital-map tile, same size, pixel-aligned (after DIR: the TEXT)")
        p.add_argument("text", nargs="?", help="the target, e.g. \"school\", \"a certain university\"")
    if command == "eval":
        p.add_argument("--split", default="val", help="split to evaluate (default val)")
        p.add_argument("--limit", type=int, default=0, help="evaluate the first N samples only (default all)")
        p.add_argument("--pictures", action="store_true", help="also write a Fig.-3-style picture per sample")
    if command == "bench":
        p.add_argument("--bench-steps", type=int, default=3,
                       help="training steps to time each way (default 3)")
        p.add_argument("--no-replays", action="store_true", help="only the steps: skip timing generation one "
                       "prompt per call and the accumulation check (minutes at 3B)")

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="socioreasoner.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command, doc in COMMANDS.items():
        p = sub.add_parser(command, help=doc)
        p.add_argument("--tiny", action="store_true", help=tiny_help(command))
        p.add_argument("--threads", type=int,
                       help="CPU threads for torch (default: 1 with --tiny, else one per core)")
        for f in dataclasses.fields(Config):
            if command in f.metadata["takes"]:
                add_flag(p, f, command)
        add_own_arguments(p, command)
    m = sub.add_parser("make-data", help="write synthetic SocioSeg-style train/ and val/ splits")
    m.add_argument("--out", default="data_sample", help="folder for train/ and val/ (default data_sample)")
    for arg, what in [("--train", "training tiles"), ("--val", "held-out tiles"), ("--size", "tile side in "
                      "pixels"), ("--seed", "random seed"),
                      ("--kinds", "2: a school and a park a tile, the text naming one; 1: one place")]:
        m.add_argument(arg, type=int, help=f"{what} (default: data_sample/synthetic.py's)")
    return parser

# The least value of each count (group_size 2: advantages are relative to the group).
AT_LEAST = dict(group_size=2, rollout_batch=1, micro_batch=1, sft_batch=1, max_new_tokens=1, save_every=1,
                sft_points=1, steps=0, sft_steps=0, eval_limit=0, eval_passes=1, generation_batch=0, seed=0,
                infer_top_k=0, rollout_top_k=0)

def check_config(cfg: Config):
    """Reject values that would fail later, deep inside a library (or silently do nothing), with one line
    naming each flag. Every command checks its whole config: a flag it does not take holds its default."""
    problems = [f"{flag(k)} must be at least {low}" for k, low in AT_LEAST.items() if getattr(cfg, k) < low]
    if cfg.select not in ("argmax", "sample"):
        problems.append(f"--select is 'argmax' or 'sample', not '{cfg.select}'")
    for name in ("temperature", "infer_temperature"):
        if not getattr(cfg, name) > 0:
            problems.append(f"{flag(name)} must be positive")
    for name in ("infer_top_p", "rollout_top_p"):
        if not 0 < getattr(cfg, name) <= 1:
            problems.append(f"{flag(name)} must be in (0, 1]")
    if not 0 < cfg.sft_lr_end <= 1:
        problems.append("--sft-lr-end must be in (0, 1]")
    if cfg.sft_points > MAX_POINTS:
        problems.append(f"--sft-points must be at most {MAX_POINTS}")
    if cfg.single_stage and cfg.stage1_only:
        problems.append("--single-stage and --stage1-only are two different ablations: give one")
    if problems:
        raise SocioError("; ".join(problems))

def join_processes(command: str):
    """Under `torchrun` (one process per GPU, or per share of the CPUs, with RANK, WORLD_SIZE, LOCAL_RANK and
    the rendezvous address in its environment): join the others, over NCCL between GPUs and gloo between
    CPUs. Only rank 0 prints; the others' errors still reach stderr."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return
    if command not in ("train", "sft"):
        raise SocioError(f"{command} runs in one process: under torchrun only train and sft (data parallel)")
    device = None
    if torch.cuda.is_available():
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            raise SocioError(f"torchrun started process {local_rank} on a machine with "
                             f"{torch.cuda.device_count()} GPU(s): one process per GPU (--nproc-per-node), "
                             "or CUDA_VISIBLE_DEVICES= for processes on the CPU")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)                 # from here on "cuda" is this process's GPU
    # the others may wait for rank 0 to write a checkpoint (a 3B run's is ~40 GB): not a hang for an hour
    dist.init_process_group("nccl" if device else "gloo", device_id=device, timeout=timedelta(hours=1))
    if rank() > 0:
        sys.stdout = open(os.devnull, "w")
    print(f"data parallel: {world_size()} processes over {dist.get_backend()}")

def main(argv=None):
    """Run a command: argv is a list of arguments (sys.argv[1:] when None)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "make-data":
            return make_data(args)
        return run_command(args)
    except SocioError as e:
        sys.exit(f"error: {e}")
    except OSError as e:      # a full disk, an --out that is a file, a folder without write permission, ...
        sys.exit(f"error: {one_line(e)}")
    except KeyboardInterrupt:
        sys.exit(interrupted(args))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

def make_data(args: argparse.Namespace):
    """--train and --val are the generator's n_train and n_val."""
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("command", "out")}
    renamed = {("n_" + k if k in ("train", "val") else k): v for k, v in given.items()}
    synthetic().make_synthetic_data(args.out, **renamed)
    counts = [len(list((Path(args.out) / s).glob("*/question.json"))) for s in ("train", "val")]
    print(f"wrote {counts[0]} train and {counts[1]} val samples to {args.out}")

def given_flags(args: argparse.Namespace) -> dict:
    """The Config fields given on the command line; `sft` is a training run whose GRPO phase has no steps."""
    given = {k: v for k, v in vars(args).items() if v is not None and k in Config.__dataclass_fields__}
    return given | {"steps": 0} if args.command == "sft" else given

def run_command(args: argparse.Namespace):
    if args.threads is not None and args.threads < 1:
        raise SocioError("--threads must be at least 1")
    if args.threads or args.tiny:
        torch.set_num_threads(args.threads or 1)
    from huggingface_hub import constants as hub_constants, utils as hub_utils
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()          # no bar per checkpoint write or read: our own lines say it...
    if not hub_constants.HF_HUB_DISABLE_PROGRESS_BARS:
        hub_utils.enable_progress_bars()       # ...but downloads from the hub keep theirs
    given = given_flags(args)
    cfg = command_config(args.command, args.tiny, given)
    load_prompts(cfg.prompts)                 # a bad prompts file stops here, before any model is loaded
    if args.command == "sft" and cfg.sft_steps < 1:
        raise SocioError("sft: --sft-steps must be at least 1")
    join_processes(args.command)
    if args.command in ("train", "sft"):
        train(cfg, set(given))
    elif args.command == "infer":
        infer(cfg, args.sat, args.map, args.text)
    elif args.command == "eval":
        run_eval(cfg, args.split, args.limit, args.pictures)
    else:
        bench(cfg, args.bench_steps, replays=not args.no_replays)

def interrupted(args: argparse.Namespace) -> str:
    if args.command not in ("train", "sft"):
        return "interrupted"
    ckpt = latest_checkpoint(Path(command_config(args.command, args.tiny, given_flags(args)).out))
    if ckpt is None:
        return "interrupted before the first checkpoint: nothing to resume; run the command again (without " \
            "--resume)"
    return f"interrupted: continue from {ckpt} with the same command and --resume"

if __name__ == "__main__":
    main()
