"""Specification of socioreasoner.py, as tests. Each test names the equation or behaviour it pins.

Run:  python -m pytest -q test_socioreasoner.py
Nothing here downloads anything: the VLM and SAM 2 are tiny random models built from their configs.
On a GPU:  SOCIOREASONER_TEST_DEVICE=cuda python -m pytest -q test_socioreasoner.py
(SOCIOREASONER_TEST_DEVICE=meta: the tiny models on the stand-in GPU of the last section; slow, for a check of
where each tensor lives on a machine without a GPU.)
"""

import contextlib
import copy
import dataclasses
import io
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch starts its threads, as socioreasoner.py
import numpy as np
import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

import socioreasoner as sr

HERE = Path(__file__).resolve().parent

# Where the tests' tiny models run (the command-line tests run where socioreasoner.py chooses). Tests compare
# numbers, so a GPU computes in float32 too: no TF32 matmuls, and no bf16 autocast unless a test asks for it.
DEVICE = torch.device(os.environ.get("SOCIOREASONER_TEST_DEVICE", "cpu"))
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def tiny_policy(seed: int, device: torch.device = torch.device("cpu")) -> sr.Policy:
    """The demo's tiny random Qwen2.5-VL (`--model tiny`), seeded."""
    return sr.build_random_policy(sr.TINY_ARCH, seed, device)


@pytest.fixture(scope="session", autouse=True)
def say_where_the_tests_run(request):
    """Said once, before the first test; SOCIOREASONER_TEST_DEVICE=meta sets the stand-in up for the run."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")       # past pytest's output capture
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\ntiny models on {DEVICE} (SOCIOREASONER_TEST_DEVICE)")
    with working_on(DEVICE) if DEVICE.type == "meta" else contextlib.nullcontext():
        yield


@pytest.fixture(scope="session", autouse=True)
def float32_unless_asked():
    """socioreasoner runs forward passes on a GPU under bf16 autocast: a test that wants it patches it in.
    For the whole session, so that a module's fixture (the SFT checkpoint) also trains in float32."""
    with pytest.MonkeyPatch.context() as patch:
        if DEVICE.type == "cuda":
            patch.setattr(sr, "_autocast", lambda device: contextlib.nullcontext())
        yield


def answer(items, think="look at the map"):
    return f"<think>{think}</think><answer>{json.dumps(items)}</answer>"


def reward1(text, gt_boxes):
    """R_1 of a completion's text: the rewards take the parsed answer, as the rollout parses each once."""
    return sr.stage1_reward(sr.parse_answer(text, 1), gt_boxes)


def reward2(text, pred_mask, gt_mask, **kw):
    return sr.stage2_reward(sr.parse_answer(text, 2), pred_mask, gt_mask, **kw)


# ------------------------------------------------------------------------------------------------------------
# §3 data: ground-truth boxes, loading, clear errors
# ------------------------------------------------------------------------------------------------------------

def test_mask_to_boxes_uses_8_connected_components_and_continuous_edges():
    mask = np.zeros((10, 12), bool)
    mask[1:3, 2:5] = True            # component A: rows 1-2, cols 2-4
    mask[3, 5] = True                # touches A only diagonally: 8-connected, so part of A
    mask[7:9, 9:11] = True           # component B
    boxes = sr.mask_to_boxes(mask)
    assert boxes.tolist() == [[2, 1, 6, 4], [9, 7, 11, 9]]
    assert sr.mask_to_boxes(np.zeros((4, 4), bool)).shape == (0, 4)


def _write_sample(d: Path, size=(32, 32), text="school", mask_size=None):
    d.mkdir(parents=True)
    Image.new("RGB", size, (10, 20, 30)).save(d / "sat.png")
    Image.new("RGB", size, (200, 200, 200)).save(d / "map.png")
    m = np.zeros(mask_size or size[::-1], np.uint8)
    m[4:10, 5:12] = 255
    Image.fromarray(m).save(d / "mask.png")
    (d / "question.json").write_text(json.dumps({"problem": text}))


def test_list_and_read_split_raw_layout(tmp_path):
    _write_sample(tmp_path / "train" / "a", size=(40, 30))
    refs = sr.list_split(tmp_path, "train")
    assert [r.id for r in refs] == ["a"] and refs[0].size == (40, 30)
    s = sr.read_sample(refs[0])
    assert s.text == "school" and s.sat.size == (40, 30) and s.mask.shape == (30, 40)
    assert s.mask.sum() == 6 * 7


def test_bad_data_is_reported_per_sample_with_the_file(tmp_path):
    _write_sample(tmp_path / "train" / "ok")
    _write_sample(tmp_path / "train" / "sizes", mask_size=(20, 20))
    _write_sample(tmp_path / "train" / "nomap")
    (tmp_path / "train" / "nomap" / "map.png").unlink()
    _write_sample(tmp_path / "train" / "garbled")
    (tmp_path / "train" / "garbled" / "sat.png").write_bytes(b"not a png")
    _write_sample(tmp_path / "train" / "noq")
    (tmp_path / "train" / "noq" / "question.json").write_text("{")
    with pytest.raises(sr.SocioError) as e:
        sr.list_split(tmp_path, "train")
    msg = str(e.value)
    assert "4 broken sample(s)" in msg
    assert "sample sizes: image sizes disagree" in msg
    assert "nomap" in msg and "map.png" in msg
    assert "garbled" in msg and "sat.png" in msg
    assert "noq" in msg and "question.json" in msg
    with pytest.raises(sr.SocioError, match="no split 'val'"):
        sr.list_split(tmp_path, "val")
    (tmp_path / "empty").mkdir()
    with pytest.raises(sr.SocioError, match="holds no usable samples"):
        sr.list_split(tmp_path, "empty")


def test_broken_samples_can_be_skipped_with_a_warning(tmp_path, capsys):
    _write_sample(tmp_path / "train" / "ok")
    _write_sample(tmp_path / "train" / "truncated")
    png = (tmp_path / "train" / "truncated" / "sat.png").read_bytes()
    (tmp_path / "train" / "truncated" / "sat.png").write_bytes(png[: len(png) // 2])   # header fine, data cut
    _write_sample(tmp_path / "train" / "blank")
    Image.new("L", (32, 32), 0).save(tmp_path / "train" / "blank" / "mask.png")
    with pytest.raises(sr.SocioError) as e:
        sr.list_split(tmp_path, "train", need_foreground=True)
    assert "2 broken" in str(e.value) and "cannot read sat image" in str(e.value)
    assert "truncated/sat.png" in str(e.value)
    assert "blank/mask.png has no foreground" in str(e.value)
    assert [r.id for r in sr.list_split(tmp_path, "train", skip_bad=True)] == ["blank", "ok"]  # may be empty
    assert capsys.readouterr().err.count("warning: skipping") == 1
    assert [r.id for r in sr.list_split(tmp_path, "train", need_foreground=True, skip_bad=True)] == ["ok"]
    assert capsys.readouterr().err.count("warning: skipping") == 2


def test_parquet_shards_list_and_read_like_the_raw_files(tmp_path):
    """The Hugging Face export: rows (id, problem, sat_image, map_image, mask_label) in <split>-*.parquet
    shards anywhere below the root, images as {bytes, path} cells or plain bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    _write_sample(tmp_path / "raw" / "train" / "a", size=(40, 30))
    raw = tmp_path / "raw" / "train" / "a"
    cell = lambda name: {"bytes": (raw / f"{name}.png").read_bytes(), "path": f"{name}.png"}
    row = {"id": "a", "problem": " school ", "sat_image": cell("sat"), "map_image": cell("map"),
           "mask_label": (raw / "mask.png").read_bytes()}
    shards = tmp_path / "hf" / "data"
    shards.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([row]), shards / "train-00000-of-00002.parquet")
    bad = pa.Table.from_pylist([{**row, "id": "b", "problem": "  "}])
    pq.write_table(bad, shards / "train-00001-of-00002.parquet")
    with pytest.raises(sr.SocioError, match=r"sample b in .*train-00001-of-00002\.parquet: 'problem'"):
        sr.list_split(tmp_path / "hf", "train")
    ref, = sr.list_split(tmp_path / "hf", "train", skip_bad=True)
    assert (ref.id, ref.text, ref.size) == ("a", "school", (40, 30))
    got, want = sr.read_sample(ref), sr.read_sample(sr.list_split(tmp_path / "raw", "train")[0])
    assert np.array_equal(got.mask, want.mask) and got.mask.sum() == 6 * 7
    assert np.array_equal(np.asarray(got.sat), np.asarray(want.sat))
    assert np.array_equal(np.asarray(got.map), np.asarray(want.map))


def test_batch_indices_walk_one_seeded_permutation_per_epoch():
    """Alg. 1 line 3: 5 samples, 3 a step: steps 0-4 cover 3 epochs, each a permutation seeded by (seed,
    epoch); a step's samples depend only on (step, seed), so a resumed run recomputes them."""
    steps = [sr.batch_indices(step, 5, 3, seed=7) for step in range(5)]
    flat = [i for step in steps for i in step]
    for epoch in range(3):
        assert flat[5 * epoch:5 * epoch + 5] == np.random.default_rng([7, epoch]).permutation(5).tolist()
    assert steps[1] == flat[3:6] and sr.batch_indices(3, 5, 3, seed=7) == steps[3]
    assert [sr.batch_indices(step, 5, 3, seed=8) for step in range(5)] != steps


def test_shipped_data_sample_is_valid_and_is_what_the_generator_makes(tmp_path):
    """Every tile of both splits lists, decodes, and has a target to find; and the shipped tiles are the
    seeded generator's own (so a change of the demo's world cannot leave stale tiles behind)."""
    gen = sr.synthetic()
    for split, n in zip(("train", "val"), gen.DATA_SAMPLE_SIZES):
        refs = sr.list_split(HERE / "data_sample", split, need_foreground=True)
        assert len(refs) == n and all(sr.read_sample(r).mask.any() for r in refs)
    texts = [r.text for r in sr.list_split(HERE / "data_sample", "val")]
    assert {"school", "educational", "park", "green space"} == set(texts)    # the text picks either kind
    for ref in sr.list_split(HERE / "data_sample", "val")[:8]:     # two places a tile, the mask the named one
        s = sr.read_sample(ref)
        fill = gen.PLACE_KINDS[s.text if s.text in gen.PLACE_KINDS else {"educational": "school",
                                                                          "green space": "park"}[s.text]][1]
        assert np.array_equal(np.asarray(s.map)[..., 2] == fill, s.mask)                 # its kind in blue
        other_text, other_mask = gen.other_kind(s.text, s.map)
        assert other_text != s.text and other_mask.any() and not (other_mask & s.mask).any()
    gen.make_synthetic_data(tmp_path, n_train=3, n_val=0, seed=0)
    for ref in sr.list_split(tmp_path, "train"):
        made, shipped = sr.read_sample(ref), sr.read_sample(sr.list_split(HERE / "data_sample", "train")[
            int(ref.id[-4:])])
        assert made.text == shipped.text and (made.mask == shipped.mask).all()
        assert (np.asarray(made.sat) == np.asarray(shipped.sat)).all()
        assert (np.asarray(made.map) == np.asarray(shipped.map)).all()


# ------------------------------------------------------------------------------------------------------------
# §4.1 coordinates: one conversion, both ways
# ------------------------------------------------------------------------------------------------------------

def test_to_frame_scales_x_and_y_separately_and_round_trips():
    boxes = np.array([[10, 20, 30, 40]])
    model = sr.to_frame(boxes, src_hw=(200, 100), dst_hw=(100, 50))       # mask (H=200, W=100) -> model
    assert model.tolist() == [[5, 10, 15, 20]]
    assert np.allclose(sr.to_frame(model, (100, 50), (200, 100)), boxes)
    pts = sr.to_frame(np.array([[28.0, 56.0]]), (56, 28), (112, 112))
    assert pts.tolist() == [[112.0, 112.0]]


# ------------------------------------------------------------------------------------------------------------
# A.2.2 format gate: parse_answer
# ------------------------------------------------------------------------------------------------------------

def test_parse_answer_accepts_the_schema_of_each_stage():
    s1 = answer([{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [0.5, 0, 9, 9.5]}])
    assert sr.parse_answer(s1, 1) == [{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [0.5, 0, 9, 9.5]}]
    s2 = answer([{"bbox_2d": [1, 2, 3, 4], "points": [[2, 3], [2.5, 3]]}])
    assert sr.parse_answer(s2, 2) == [{"bbox_2d": [1, 2, 3, 4], "points": [[2, 3], [2.5, 3]]}]
    assert sr.parse_answer(answer([]), 1) == []                           # "nothing here" is well-formed
    assert sr.parse_answer("  \n" + s1 + "\n", 1) is not None             # surrounding whitespace ok


@pytest.mark.parametrize("text", [
    "",
    "[{\"bbox_2d\": [1, 2, 3, 4]}]",                                       # no tags
    "<answer>[{\"bbox_2d\": [1, 2, 3, 4]}]</answer>",                      # no think
    "<think>x</think><answer>[{\"bbox_2d\": [1, 2, 3, 4]}]",                # cut off before </answer>
    "<think>x</think><answer>[{\"bbox_2d\": [1, 2, 3, 4]}]</answer> and more",
    answer({"bbox_2d": [1, 2, 3, 4]}),                                      # object, not list
    answer([[1, 2, 3, 4]]),                                                 # list of lists
    answer([{"bbox_2d": [1, 2, 3]}]),                                       # 3 numbers
    answer([{"bbox_2d": [1, 2, "3", 4]}]),                                  # a string
    answer([{"bbox_2d": [1, 2, True, 4]}]),                                 # a boolean
    answer([{"bbox_2d": [5, 2, 3, 4]}]),                                    # x2 < x1
    answer([{"bbox_2d": [1, 4, 3, 4]}]),                                    # zero height
    answer([{"bbox_2d": [1, 2, 3, 4], "points": [[2, 3]]}]),                # stage-2 key in stage 1
    "<think>x</think><answer>[{\"bbox_2d\": [1, 2, NaN, 4]}]</answer>",
    "<think>x</think><answer>[{\"bbox_2d\": [1, 2, Infinity, 4]}]</answer>",
    "<think>x</think><answer>[{\"bbox_2d\": [1, 2, 1e999, 4]}]</answer>",
    "<think>x</think><answer>[{\"bbox_2d\": [1, 2, " + "9" * 5000 + ", 4]}]</answer>",
    "<think>x</think><answer>" + "[" * 100000 + "</answer>",              # refused by the length cap
    "<think>x</think><answer>" + "[" * 50_000 + "</answer>",               # RecursionError in json
    "<think>x</think><answer>[{\"bbox_2d\": [1, 2, " + "9" * 400 + ", 4]}]</answer>",  # OverflowError
    answer([{"bbox_2d": [0, 0, 1, 1]}] * (sr.MAX_OBJECTS + 1)),
])
def test_parse_answer_rejects_malformed_stage1(text):
    assert sr.parse_answer(text, 1) is None


@pytest.mark.parametrize("items", [
    [{"bbox_2d": [1, 2, 3, 4]}],                                            # no points
    [{"bbox_2d": [1, 2, 3, 4], "points": [2, 3]}],                          # flat list
    [{"bbox_2d": [1, 2, 3, 4], "points": [[2, 3, 4]]}],                     # 3-d point
    [{"bbox_2d": [1, 2, 3, 4], "points": [[2, None]]}],
    [{"bbox_2d": [1, 2, 3, 4], "points": [[2, 3]] * (sr.MAX_POINTS + 1)}],
])
def test_parse_answer_rejects_malformed_stage2(items):
    assert sr.parse_answer(answer(items), 2) is None


def test_parse_answer_on_random_text_returns_valid_geometry_that_round_trips():
    """Whatever the text, the parser returns None or finite boxes with x1 < x2, y1 < y2 and finite points,
    and writing a parsed answer back out parses to the same answer."""
    rng = np.random.default_rng(0)
    alphabet = list('<>/[]{}",:.-0123456789eE thinkanswerbox_2dpointsNaI\n\\u') + ["<think>", "</think>",
                                                                                   "<answer>", "</answer>"]
    good = answer([{"bbox_2d": [1, 2, 30, 40], "points": [[5, 6]]}])
    parsed = 0
    for i in range(3000):
        if i % 2:
            text = "".join(rng.choice(alphabet, size=rng.integers(0, 80)))
        else:  # mutate a valid answer: delete, duplicate or replace a few characters
            chars = list(good)
            for _ in range(rng.integers(1, 4)):
                j = rng.integers(len(chars))
                op = rng.integers(3)
                if op == 0:
                    del chars[j]
                elif op == 1:
                    chars.insert(j, chars[j])
                else:
                    chars[j] = str(rng.choice(alphabet))
            text = "".join(chars)
        for stage in (1, 2):
            out = sr.parse_answer(text, stage)
            if out is None:
                continue
            parsed += 1
            for o in out:
                (x1, y1, x2, y2) = o["bbox_2d"]
                assert all(math.isfinite(v) for v in o["bbox_2d"]) and x1 < x2 and y1 < y2
                assert set(o) == ({"bbox_2d"} if stage == 1 else {"bbox_2d", "points"})
                assert all(len(p) == 2 and all(math.isfinite(v) for v in p) for p in o.get("points", []))
            assert sr.parse_answer(answer(out), stage) == out
    assert parsed > 100                                                  # the invariants were exercised


def hostile_completion(rng) -> str:
    """A completion an RL policy might write: random JSON-ish structure, wrong types, absurd numbers."""
    def value(depth):
        kind = rng.integers(9)
        if kind == 0 or depth > 3:
            return float(rng.choice([0, -1, 1e300, -1e300, 1e-300, 3.5, 1e20, 10**30]))
        if kind == 1:
            return int(rng.integers(-500, 500))
        if kind == 2:
            return str(rng.choice(["NaN", "x", "\u00e9\u4e2d", "", "12"]))
        if kind == 3:
            return [value(depth + 1) for _ in range(rng.integers(0, 6))]
        if kind == 4:
            return {str(rng.choice(["bbox_2d", "points", "box"])): value(depth + 1)}
        if kind == 5:                                                    # a plausible box, maybe inverted
            return [float(v) for v in rng.uniform(-300, 600, 4)]
        if kind == 6:
            return {"bbox_2d": value(depth + 1), "points": value(depth + 1)}
        if kind == 7:
            return [{"bbox_2d": [float(v) for v in rng.uniform(-300, 600, 4)],
                     "points": [[float(v) for v in rng.uniform(-300, 600, 2)]
                                for _ in range(rng.integers(0, 5))]}
                    for _ in range(rng.integers(0, 4))]
        return None
    body = json.dumps(value(0))
    for literal in ("NaN", "Infinity", "-Infinity"):                     # json.dumps never writes these
        if rng.random() < 0.05:
            body = body.replace("0.0", literal, 1)
    if rng.random() < 0.1:
        body = body[: rng.integers(len(body) + 1)]                        # cut off at the token limit
    if rng.random() < 0.05:
        body = "[" + ", ".join([body] * int(rng.integers(30, 60))) + "]"  # too many objects
    return f"<think>{'.' * int(rng.integers(3))}</think><answer>{body}</answer>"


def test_rewards_never_raise_and_bad_geometry_never_reaches_the_segmenter():
    """Thousands of seeded hostile completions: every one gets a finite reward in range; the segmenter only
    ever sees finite boxes with area, inside the image, and points inside the image."""
    rng = np.random.default_rng(7)
    seg = BoxFiller()
    hw = (60, 80)
    enc = seg.encode(np.zeros((*hw, 3), np.uint8))
    gt = np.zeros(hw, bool); gt[10:30, 20:50] = True
    gt_boxes = sr.mask_to_boxes(gt)
    formats = 0
    for i in range(4000):
        text = hostile_completion(rng)
        r1 = reward1(text, gt_boxes)
        for stage in (1, 2):
            mask = sr.segment_answer(seg, enc, sr.parse_answer(text, stage), (112, 112), hw)
            r = reward2(text, mask, gt) if stage == 2 else r1
            assert all(math.isfinite(v) for v in r.values())
            assert 0 <= r["total"] <= 3 and r["format"] in (0, 1)
            formats += r["format"]
    assert 0 < formats < 8000                                             # both branches were exercised
    for boxes, points in seg.calls:
        assert np.isfinite(boxes).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= 80).all() and (boxes[:, [1, 3]] <= 60).all()
        for p in points or []:
            assert np.isfinite(p).all() and (p >= 0).all() and (p[:, 0] < 80).all() and (p[:, 1] < 60).all()


# ------------------------------------------------------------------------------------------------------------
# A.2.2 stage 1: box IoU, Hungarian accuracy (eq. 7), length (eq. 8), total (eq. 9)
# ------------------------------------------------------------------------------------------------------------

def test_box_iou_hand_computed():
    a = np.array([[0, 0, 2, 2], [0, 0, 1, 1]])
    b = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]])
    iou = sr.box_iou(a, b)
    assert iou.shape == (2, 3)
    assert np.allclose(iou, [[1 / 7, 1, 0], [0, 1 / 4, 0]])
    assert sr.box_iou(np.zeros((0, 4)), b).shape == (0, 3)


def test_hungarian_matches_against_brute_force():
    rng = np.random.default_rng(1)

    def boxes(n):
        corner = rng.uniform(0, 20, (n, 2))
        return np.concatenate([corner, corner + rng.uniform(1, 10, (n, 2))], 1)

    for _ in range(300):
        K, J = int(rng.integers(0, 5)), int(rng.integers(0, 5))
        pred, gt = boxes(K), boxes(J)
        for k in range(min(K, J)):                       # near-copies, so that matches and conflicts happen
            if rng.random() < 0.6:
                pred[k] = gt[rng.integers(J)] + rng.uniform(-1.5, 1.5, 4)
                pred[k, 2:] = np.maximum(pred[k, 2:], pred[k, :2] + 0.5)
        m = sr.box_iou(pred, gt) > 0.5
        # every one-to-one assignment of the smaller side into the larger
        if K <= J:
            best = max(sum(m[k, j] for k, j in enumerate(p)) for p in itertools.permutations(range(J), K))
        else:
            best = max(sum(m[k, j] for j, k in enumerate(p)) for p in itertools.permutations(range(K), J))
        assert sr.hungarian_matches(pred, gt) == best


def test_stage1_reward_hand_computed():
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30]])                     # J = 2
    # K = 3: two boxes match (IoU 1 and 81/100 > 0.5), one is elsewhere.
    r = reward1(answer([{"bbox_2d": [0, 0, 10, 10]}, {"bbox_2d": [21, 21, 30, 30]},
                                 {"bbox_2d": [50, 50, 60, 60]}]), gt)
    assert r["format"] == 1
    assert r["accuracy"] == pytest.approx(2 / 3)                        # N_m / max(K, J)
    assert r["length"] == pytest.approx(math.exp(-2 * 1 / 2))           # exp(-2|K-J|/J)
    assert r["total"] == pytest.approx(1 + 2 / 3 + math.exp(-1))
    # Two predictions on the same ground-truth box: one-to-one, so only one match.
    r = reward1(answer([{"bbox_2d": [0, 0, 10, 10]}, {"bbox_2d": [0, 0, 10, 9]}]), gt)
    assert r["accuracy"] == pytest.approx(1 / 2) and r["length"] == pytest.approx(1.0)
    # IoU exactly 0.5 is not a match (the threshold is strict).
    r = reward1(answer([{"bbox_2d": [0, 0, 10, 5]}]), gt[:1])
    assert r["accuracy"] == 0.0
    # K = 0: well-formed, nothing matched.
    r = reward1(answer([]), gt)
    assert (r["format"], r["accuracy"], r["length"]) == (1.0, 0.0, pytest.approx(math.exp(-2)))


def test_stage1_reward_no_ground_truth_and_format_gate():
    none = np.zeros((0, 4))
    assert reward1(answer([]), none)["total"] == pytest.approx(3.0)
    r = reward1(answer([{"bbox_2d": [0, 0, 1, 1]}] * 2), none)
    assert (r["accuracy"], r["length"]) == (0.0, pytest.approx(math.exp(-4)))
    r = reward1("<think>x</think><answer>[{\"bbox_2d\": [0, 0, 10, 10]}", np.array([[0, 0, 10, 10]]))
    assert r == {"format": 0.0, "accuracy": 0.0, "length": 0.0, "total": 0.0}


# ------------------------------------------------------------------------------------------------------------
# A.2.2 stage 2: pixel IoU (eq. 10), point-count Gaussian (eq. 11), total (eq. 12)
# ------------------------------------------------------------------------------------------------------------

def test_mask_iou_hand_computed():
    a = np.zeros((4, 4), bool); a[:2, :2] = True                          # 4 px
    b = np.zeros((4, 4), bool); b[1:3, 1:3] = True                        # 4 px, 1 shared
    assert sr.mask_iou(a, b) == pytest.approx(1 / 7)
    assert sr.mask_iou(a, a) == 1.0
    assert sr.mask_iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0
    assert sr.mask_iou(a, np.zeros((4, 4), bool)) == 0.0


def test_point_count_score_is_a_gaussian_peaking_at_mu():
    assert sr.point_count_score(2) == pytest.approx(1.0)
    assert sr.point_count_score(0) == pytest.approx(math.exp(-4 / 8))
    assert sr.point_count_score(5) == pytest.approx(math.exp(-9 / 8))
    assert sr.point_count_score(1, mu=1) == pytest.approx(1.0)


def test_stage2_reward_hand_computed():
    gt = np.zeros((8, 8), bool); gt[:4, :4] = True                        # 16 px
    pred = np.zeros((8, 8), bool); pred[:4, :2] = True                    # 8 px inside
    text = answer([{"bbox_2d": [0, 0, 4, 4], "points": [[1, 1], [2, 2]]},
                   {"bbox_2d": [4, 4, 8, 8], "points": [[5, 5], [6, 6], [7, 7], [5, 6]]}])
    r = reward2(text, pred, gt)
    assert r["format"] == 1 and r["accuracy"] == pytest.approx(0.5)
    assert r["length"] == pytest.approx((1 + math.exp(-4 / 8)) / 2)      # mean over G' = 2 groups
    assert r["total"] == pytest.approx(1 + 0.5 + (1 + math.exp(-0.5)) / 2)
    r = reward2(answer([]), np.zeros((8, 8), bool), gt)          # no groups
    assert (r["accuracy"], r["length"], r["total"]) == (0.0, 0.0, 1.0)
    # stage-1 syntax is not stage-2 syntax: the gate zeroes everything, even a perfect mask.
    assert reward2(answer([{"bbox_2d": [0, 0, 4, 4]}]), gt, gt)["total"] == 0.0


# ------------------------------------------------------------------------------------------------------------
# eq. 3 renderer
# ------------------------------------------------------------------------------------------------------------

def test_render_shades_the_mask_and_outlines_boxes_without_touching_the_input():
    img = Image.new("RGB", (20, 10), (0, 0, 255))
    mask = np.zeros((10, 20), bool); mask[2:4, 2:4] = True
    out = np.asarray(sr.render(img, np.array([[10, 2, 18, 8]]), mask))
    assert tuple(out[3, 3]) == (102, 0, 153)                              # 0.4 red + 0.6 blue
    assert tuple(out[0, 0]) == (0, 0, 255)                                # untouched
    assert tuple(out[2, 10]) == sr.BOX_RGB and tuple(out[5, 14]) == (0, 0, 255)  # outline, not fill
    # the box's edge pixels, right and bottom too: columns 10 and 17, rows 2 and 7 (pixel c covers [c, c+1))
    assert tuple(out[5, 17]) == sr.BOX_RGB and tuple(out[5, 18]) == (0, 0, 255)
    assert tuple(out[7, 14]) == sr.BOX_RGB and tuple(out[8, 14]) == (0, 0, 255)
    assert np.asarray(img)[3, 3].tolist() == [0, 0, 255]


def test_segmentation_metrics_hand_computed():
    """§5.1: cIoU sums over the split, gIoU averages per image (both-empty = 1), F1 matches instances."""
    gt1 = np.zeros((10, 10), bool); gt1[0:2, 0:2] = True; gt1[5:7, 5:7] = True     # 2 instances, 8 px
    p1 = np.zeros((10, 10), bool); p1[0:2, 0:2] = True; p1[8:10, 0:2] = True       # 1 hit, 1 false alarm
    gt2 = np.zeros((10, 10), bool); gt2[0:4, 0:4] = True                           # 16 px
    p2 = np.zeros((10, 10), bool); p2[0:4, 0:2] = True                             # 8 px inside: IoU 0.5
    empty = np.zeros((10, 10), bool)
    m = sr.segmentation_metrics([p1, p2, empty], [gt1, gt2, empty])
    # image 1: I 4, U 12 -> 1/3; image 2: I 8, U 16 -> 1/2 (not > 0.5: no instance match); image 3: 1
    assert m["cIoU"] == pytest.approx(100 * (4 + 8) / (12 + 16))
    assert m["gIoU"] == pytest.approx(100 * (1 / 3 + 1 / 2 + 1) / 3)
    # TP 1; predicted instances 2 + 1, ground-truth instances 2 + 1: F1 = 2 / (3 + 3)
    assert m["F1"] == pytest.approx(100 * 2 / 6)
    assert sr.instance_matches(gt1, gt1) == (2, 2, 2)


def test_the_metrics_of_no_masks_are_refused_not_a_perfect_score():
    """0/0 is not cIoU 100 and F1 100 (nor is the mean of no IoUs a gIoU): scoring nothing is an error."""
    with pytest.raises(ValueError, match="no masks"):
        sr.segmentation_metrics([], [])


def test_grow_segmenter_answers_to_boxes_and_points():
    """The demo's weights-free S: a box alone is its rectangle; a point grows over its colour, in its box."""
    img = np.full((60, 60, 3), 100, np.uint8)
    img[10:40, 10:40] = (200, 60, 60)                                       # a red place, 30 x 30
    seg = sr.GrowSegmenter()
    enc = seg.encode(img)
    box = np.array([[5.0, 5.0, 45.0, 45.0]])
    assert seg.segment(enc, box, None).sum() == 40 * 40
    on_target = seg.segment(enc, box, [np.array([[20.0, 20.0]])])
    place = img[..., 0] == 200
    assert sr.mask_iou(on_target, place) > 0.85                        # smoothing blurs the edges a little
    on_ground = seg.segment(enc, box, [np.array([[6.0, 6.0]])])
    assert not (on_ground & place).any() and on_ground.sum() > 100
    assert not on_ground[46:, :].any() and not on_ground[:, 46:].any()    # never leaves its box
    outside = seg.segment(enc, box, [np.array([[50.0, 50.0]])])        # a point outside its box is ignored
    assert outside.sum() == 40 * 40


# ------------------------------------------------------------------------------------------------------------
# §4.2 GRPO: advantages and eq. 6
# ------------------------------------------------------------------------------------------------------------

def test_group_advantages_subtract_each_groups_mean():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    assert sr.group_advantages(r, 3).tolist() == [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]


def _loss_inputs(B=3, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g) * 3).requires_grad_()
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    return logp, mask


def test_grpo_loss_at_ratio_one_is_minus_mean_advantage_and_k3_vanishes():
    logp, mask = _loss_inputs()
    adv = torch.tensor([1.0, -2.0, 0.5])
    loss, st = sr.grpo_loss(logp, logp.detach(), logp.detach(), adv, mask, clip_eps=0.2, kl_beta=0.1)
    assert loss.item() == pytest.approx(-adv.mean().item())              # ratio 1, token mean = A
    assert st["kl"] == pytest.approx(0.0) and st["clipped"] == 0.0
    loss.backward()
    # d loss / d logp_t = -A / (T_i * B) on unmasked tokens: REINFORCE with a baseline.
    expected = -adv[:, None] / mask.sum(1, keepdim=True) / 3 * mask
    assert torch.allclose(logp.grad, expected)


def test_grpo_loss_clips_on_both_sides_for_both_advantage_signs():
    eps = 0.2
    old = torch.zeros(4, 1)
    # ratio 1.5: clipped for A > 0 (no gain past 1 + eps), not for A < 0 (pessimistic min keeps 1.5 A).
    # ratio 0.5: clipped for A < 0, not for A > 0.
    logp = torch.log(torch.tensor([[1.5], [1.5], [0.5], [0.5]])).requires_grad_()
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, st = sr.grpo_loss(logp, old, logp.detach(), adv, torch.ones(4, 1), eps, kl_beta=0.0)
    assert loss.item() == pytest.approx(-(1.2 * 1 + 1.5 * -1 + 0.5 * 1 + 0.8 * -1) / 4)
    assert st["clipped"] == pytest.approx(0.5)
    loss.backward()
    # clipped rows get no gradient; unclipped rows get -A * ratio / B (d ratio / d logp = ratio)
    assert torch.allclose(logp.grad.view(-1), torch.tensor([0.0, 1.5 / 4, -0.5 / 4, 0.0]))


def test_k3_kl_is_zero_when_policies_agree_and_positive_otherwise():
    logp = torch.log(torch.tensor([[0.5, 0.2]]))
    ref = torch.log(torch.tensor([[0.25, 0.4]]))
    _, st = sr.grpo_loss(logp, logp, logp, torch.zeros(1), torch.ones(1, 2), 0.2, 1.0)
    assert st["kl"] == 0.0
    loss, st = sr.grpo_loss(logp, logp, ref, torch.zeros(1), torch.ones(1, 2), 0.2, 1.0)
    q = torch.log(torch.tensor([0.5, 2.0]))                               # log ref/pi per token
    expected = (torch.exp(q) - q - 1).mean().item()
    assert st["kl"] == pytest.approx(expected) and loss.item() == pytest.approx(expected) and expected > 0


def test_masked_tokens_get_no_gradient():
    logp, mask = _loss_inputs()
    ref = logp.detach() - 0.3
    loss, _ = sr.grpo_loss(logp, logp.detach(), ref, torch.tensor([1.0, -1.0, 2.0]), mask, 0.2, 0.05)
    loss.backward()
    assert (logp.grad[mask == 0] == 0).all() and (logp.grad[mask == 1] != 0).all()


def test_grpo_loss_raises_the_expected_reward_of_a_toy_policy():
    """Sign and normalisation of eq. 6, independent of the VLM: a policy over 3-token answers, reward = share
    of tokens equal to a known best answer. A few dozen GRPO updates must raise the expected reward."""
    torch.manual_seed(0)
    T, V, G, best = 3, 6, 8, torch.tensor([1, 4, 2])
    logits = torch.zeros(T, V, requires_grad=True)                       # position-wise categorical policy
    ref = torch.log_softmax(torch.zeros(T, V), -1)
    opt = torch.optim.Adam([logits], lr=0.1)
    expected = lambda: torch.softmax(logits, -1)[torch.arange(T), best].mean().item()
    start = expected()
    for _ in range(40):
        answers = torch.distributions.Categorical(logits=logits.detach()).sample((4 * G,))   # 4 groups of G
        rewards = (answers == best).float().mean(1)
        logp = torch.log_softmax(logits, -1)[torch.arange(T), answers]                      # (4G, T)
        mask = torch.ones(4 * G, T)
        mask[::2, 2] = 0                                                  # some answers one token shorter
        loss, _ = sr.grpo_loss(logp, logp.detach(), ref[torch.arange(T), answers],
                               sr.group_advantages(rewards, G), mask, clip_eps=0.5, kl_beta=0.005)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert start == pytest.approx(1 / V) and expected() > 0.8


def test_equal_rewards_give_zero_advantage_zero_gradient_and_no_nan():
    odd = 1 + 1 / 3 + math.exp(-2 / 3)                # a float mean of 8 copies of it is off by an ulp
    adv = sr.group_advantages(torch.tensor([odd] * 8 + [2.5] * 8), 8)
    assert (adv == 0).all()
    logp, mask = _loss_inputs(B=16)
    loss, _ = sr.grpo_loss(logp, logp.detach(), logp.detach(), adv, mask, 0.5, 0.005)
    loss.backward()
    assert torch.isfinite(loss) and (logp.grad == 0).all()


# ------------------------------------------------------------------------------------------------------------
# §4.2 the policy: a tiny random Qwen2.5-VL built from its real classes
# ------------------------------------------------------------------------------------------------------------

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def policy():
    return tiny_policy(seed=0, device=DEVICE)


@pytest.fixture(scope="module")
def sample():
    return sr.read_sample(sr.list_split(HERE / "data_sample", "train")[0])


@pytest.fixture
def fresh_policy(policy):
    """A copy of the shared tiny policy (seed 0) for a test to train: copying costs less than building."""
    torch.manual_seed(0)                                       # as building it would: the draws that follow
    return dataclasses.replace(policy, model=copy.deepcopy(policy.model))


@pytest.fixture(scope="module")
def tiny_sam():
    """One random small SAM 2 for the tests that need the real segmenter's plumbing."""
    return sr.load_segmenter(sr.Config(sam="tiny"), DEVICE)


def test_model_frame_is_the_processors_resized_frame(policy, sample):
    inputs, hw = sr.policy_inputs(policy, [sample.map, sample.sat], sr.STAGE1_PROMPT, sample.text)
    assert hw == (112, 112) and sample.sat.size == (224, 224)            # the tiny processor halves the tiles
    assert sr.model_frame(policy, (200, 150)) == (84, 112)               # (W, H) = (200, 150) -> (H', W')
    prompt = policy.processor.tokenizer.decode(inputs["input_ids"][0])
    assert "112x112 pixels" in prompt and sample.text in prompt
    assert prompt.index("<|image_pad|>") < prompt.index("Target")        # images first, then the text


def test_logprobs_from_one_forward_match_generates_logits(policy, sample, monkeypatch):
    """Re-scoring prompt + completion in one forward reproduces generate's own distribution (EOS kept,
    temperature applied, vision tokens removed),
    for prompts of different lengths sampled together: left-padded for generate, right-padded when scored."""
    refs = sr.list_split(HERE / "data_sample", "train")[:3]
    samples = [sr.read_sample(r) for r in refs]
    prompts = [sr.stage1_prompt(policy, s)[0] for s in samples[:2]]          # two targets (one token each)
    prompts.append(sr.stage2_inputs(policy, samples[2], np.array([[10, 20, 30, 40]]), (112, 112),
                                    samples[2].mask))                         # a rendered prompt, one box
    prompts.insert(1, sr.stage2_inputs(policy, samples[1], np.array([[10, 20, 30, 40], [50, 50, 90, 100.5]]),
                                       (112, 112), samples[1].mask))        # a longer, rendered prompt
    assert len({p["input_ids"].shape[1] for p in prompts}) >= 3
    logits, generate = [], policy.model.generate
    def spy(**kw):                                    # sample_completions' own call, with the logits kept
        out = generate(**kw, output_logits=True, return_dict_in_generate=True)
        logits.append(torch.stack(out.logits, 1).float().cpu())              # (k n, T, V) per call
        return out.sequences
    monkeypatch.setattr(policy.model, "generate", spy)
    torch.manual_seed(3)
    T, n = 1.3, 3
    seen = []                                         # patches through the vision tower
    hook = policy.model.model.visual.register_forward_hook(lambda m, args, out: seen.append(len(args[0])))
    try:
        comps = sr.sample_completions(policy, prompts, n, T, top_p=1.0, top_k=0, max_new_tokens=12, batch=0)
    finally:
        hook.remove()
    assert len(logits) == 1 and [len(c) for c in comps] == [n] * 4           # one generate call for all
    assert seen == [sum(len(p["pixel_values"]) for p in prompts)]            # images once, not once per row
    # generate's raw logits -> the sampled distribution: / T, vision tokens removed
    raw = logits[0] / T
    raw[..., policy.vision_ids] = float("-inf")
    rows = [(p, c) for p, cs in zip(prompts, comps) for c in cs]
    logp, mask = sr.completion_logprobs(policy, policy.model, rows, T)
    for i, (_, c) in enumerate(rows):
        expected = raw[i, :len(c)].log_softmax(-1).gather(-1, c[:, None]).squeeze(-1)
        assert mask[i].sum() == len(c)
        assert torch.allclose(logp[i, :len(c)].cpu(), expected, atol=1e-5)


def test_the_vision_tower_runs_once_over_the_distinct_tiles_when_scoring(policy, sample):
    """One vision pass per scoring call, over the distinct tiles only: G rows of one prompt share it, and so
    do two prompts that show the same tiles (one tile asked about its two places, as in the warm-up); each
    row's log-probs equal those of the row scored alone."""
    inputs, _ = sr.policy_inputs(policy, [sample.map, sample.sat], sr.STAGE1_PROMPT, sample.text)
    same_tiles, _ = sr.policy_inputs(policy, [sample.map, sample.sat], sr.STAGE1_PROMPT, "park")
    other, _ = sr.policy_inputs(policy, [sample.sat, sample.map], sr.STAGE1_PROMPT, "park")
    assert same_tiles["pixel_values"] is not inputs["pixel_values"]              # equal, not the same object
    rows = [(inputs, torch.tensor([60, 61, 62])), (inputs, torch.tensor([70])),
            (same_tiles, torch.tensor([75, 76])), (other, torch.tensor([80, 81]))]
    patches = []                                                      # the pixel rows of each tower call
    hook = policy.model.model.visual.register_forward_hook(lambda m, args, out: patches.append(len(args[0])))
    try:
        together, _ = sr.completion_logprobs(policy, policy.model, rows, 1.0)
    finally:
        hook.remove()
    # one call, over the tiles of `inputs` and `other` (2 images each): four rows, three prompts, two tile sets
    assert patches == [len(inputs["pixel_values"]) + len(other["pixel_values"])]
    for i, row in enumerate(rows):
        alone, _ = sr.completion_logprobs(policy, policy.model, [row], 1.0)
        assert torch.allclose(alone[0], together[i, :len(row[1])], atol=1e-5)


def test_completions_end_at_the_first_eos_and_only_completion_tokens_are_scored(policy, sample):
    inputs, _ = sr.policy_inputs(policy, [sample.map, sample.sat], sr.STAGE1_PROMPT, sample.text)
    eos = policy.eos_ids[0]
    short = torch.tensor([60, 61, eos])                                   # '<=' then EOS: 3 tokens
    long = torch.tensor([60, 61, 62, 63, 64])                             # cut off by max_new_tokens
    logp, mask = sr.completion_logprobs(policy, policy.model, [(inputs, short), (inputs, long)], 1.0)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]           # EOS counts, padding does not
    assert (logp[0, 3:] == 0).all() and (logp[mask.bool()] < 0).all()
    # the same row scored alone gives the same numbers: padding does not leak into real positions
    alone, _ = sr.completion_logprobs(policy, policy.model, [(inputs, short)], 1.0)
    assert torch.allclose(alone[0], logp[0, :3], atol=1e-5)
    assert sr.decode(policy, short) == "<="                               # the EOS is not part of the text


def _rows(policy, samples, texts):
    """Rows (prompt inputs, completion ids) from hand-written completions, prompts of different lengths."""
    tok = policy.processor.tokenizer
    rows = []
    for s, text in zip(samples, texts):
        inputs, _ = sr.policy_inputs(policy, [s.map, s.sat], sr.STAGE1_PROMPT, s.text)
        ids = torch.tensor(tok(text)["input_ids"] + [policy.eos_ids[0]])
        rows.append((inputs, ids))
    return rows


def test_accumulated_gradient_equals_full_batch_gradient():
    """Micro-batching must not change the gradient (token mean per row, mean over rows)."""
    refs = sr.list_split(HERE / "data_sample", "train")[:3]
    samples = [sr.read_sample(r) for r in refs] * 2
    pol = tiny_policy(seed=1, device=DEVICE)
    reference = tiny_policy(seed=2, device=DEVICE).model      # differs: the KL term has a gradient
    texts = ["<think>a</think><answer>[]</answer>", "x" * 9, "<think>bb</think>", "y", "zz" * 7, "<answer>"]
    rows = _rows(pol, samples, texts)
    adv = torch.tensor([0.5, -1.0, 2.0, 0.0, -0.3, 0.7], device=DEVICE)       # where the log-probs are
    grads = []
    for micro in (6, 4, 1):
        cfg = sr.Config(micro_batch=micro, kl_beta=0.3)
        pol.model.zero_grad(set_to_none=True)
        sr.accumulate_grpo_gradients(pol, reference, rows, adv, cfg)
        grads.append(torch.cat([p.grad.flatten() for p in pol.model.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 0
    for g in grads[1:]:
        assert torch.allclose(g, grads[0], atol=1e-6, rtol=1e-4)


def _groups(policy, sizes, seed=0):
    """Rows of groups sharing their prompt (same inputs object), prompts and completions of different
    lengths: a stage-1 prompt, a longer stage-2 one, another target on smaller tiles (fewer image tokens,
    so other M-RoPE deltas); sizes: completions per group."""
    samples = [sr.read_sample(r) for r in sr.list_split(HERE / "data_sample", "train")[:3]]
    small = [image.resize((224, 112)) for image in (samples[2].map, samples[2].sat)]
    prompts = [sr.stage1_prompt(policy, samples[0])[0],
               sr.stage2_inputs(policy, samples[1], np.array([[10, 20, 30, 40]]), (112, 112), samples[1].mask),
               sr.policy_inputs(policy, small, sr.STAGE1_PROMPT, samples[2].text)[0]]
    assert len({p["input_ids"].shape[1] for p in prompts}) == 3
    g = torch.Generator().manual_seed(seed)
    return [(p, torch.randint(300, 520, (int(torch.randint(1, 13, (), generator=g)),), generator=g))
            for p, n in zip(prompts, sizes) for _ in range(n)]


@pytest.mark.parametrize("attention, checkpointing", [("sdpa", False), ("sdpa", True), ("eager", False)])
def test_shared_prompt_scoring_equals_one_row_per_completion(attention, checkpointing):
    """A group packed as [prompt, completion 1, ..., completion G] (prefix-sharing mask, the positions
    each completion was sampled at) gives the plain path's log-probs and GRPO gradients, however the rows
    are cut into micro-batches (groups split across them too), with gradient checkpointing on (and the
    vision tower frozen) and with eager attention (which adds the mask to the scores)."""
    pol = tiny_policy(seed=1, device=DEVICE)
    reference = tiny_policy(seed=2, device=DEVICE).model   # differs, so the KL term has a gradient
    pol.model.set_attn_implementation(attention)
    reference.set_attn_implementation(attention)
    sr.prepare_policy(pol, sr.Config(grad_checkpointing=checkpointing, freeze_vision=checkpointing))
    pol.model.train()
    rows = _groups(pol, [3, 2, 4])
    plain, mask = sr.completion_logprobs(pol, pol.model, rows, 1.3, shared_prompt=False)
    shared, shared_mask = sr.completion_logprobs(pol, pol.model, rows, 1.3, shared_prompt=True)
    assert torch.equal(mask, shared_mask) and len(set(mask.sum(1).tolist())) > 2
    assert (shared - plain).abs().max() < 1e-5
    adv = torch.tensor([0.5, -1.0, 2.0, 0.3, -0.3, 0.7, -1.2, 0.1, 0.4], device=DEVICE)
    grads = {}
    for shared_prompt, micro in ((False, 9), (True, 9), (True, 4)):              # 4: a group cut in two
        cfg = sr.Config(micro_batch=micro, kl_beta=0.3, temperature=1.3, shared_prompt=shared_prompt)
        pol.model.zero_grad(set_to_none=True)
        sr.accumulate_grpo_gradients(pol, reference, rows, adv, cfg)
        grads[shared_prompt, micro] = torch.cat([p.grad.flatten() for p in pol.model.parameters()
                                                 if p.grad is not None])
    expected = grads[False, 9]
    assert expected.abs().max() > 0
    for key in ((True, 9), (True, 4)):
        assert (grads[key] - expected).norm() / expected.norm() < 1e-5, key


def test_a_frozen_vision_tower_stays_out_of_the_backward_pass_under_checkpointing():
    """--freeze-vision with --grad-checkpointing: the ViT's features carry no autograd graph (transformers'
    checkpointing hooks the patch embedding to make its output require grad, which put the frozen ViT into
    every backward), and eq. 6's gradients are those computed without checkpointing, none for the ViT."""
    reference = tiny_policy(seed=2, device=DEVICE).model
    adv = torch.tensor([0.5, -1.0, 2.0, 0.3], device=DEVICE)
    grads = {}
    for checkpointing in (False, True):
        pol = tiny_policy(seed=1, device=DEVICE)
        sr.prepare_policy(pol, sr.Config(grad_checkpointing=checkpointing, freeze_vision=True))
        pol.model.train()
        rows = _groups(pol, [2, 1, 1])
        prompt = rows[0][0]
        features = pol.model.model.get_image_features(prompt["pixel_values"].to(DEVICE),
                                                      prompt["image_grid_thw"].to(DEVICE), return_dict=True)
        assert not any(f.requires_grad for f in features.pooler_output), checkpointing
        pol.model.zero_grad(set_to_none=True)
        sr.accumulate_grpo_gradients(pol, reference, rows, adv, sr.Config(micro_batch=4, kl_beta=0.3))
        grads[checkpointing] = {name: p.grad for name, p in pol.model.named_parameters()
                                if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    assert not any(".visual." in name for name in grads[True])
    for name, g in grads[False].items():
        assert torch.allclose(grads[True][name], g, atol=1e-7, rtol=1e-5), name


def test_shared_prompt_sampling_keeps_generates_distribution(policy, monkeypatch):
    """Each prompt prefilled once, its KV cache and M-RoPE deltas repeated for its n samples: the same
    logits at every step as generate's own n-fold prefill (logits, not only tokens: unrepeated deltas can
    leave greedy output right), the same samples for the same seed, greedy output identical, and the
    packed scoring returns the log-probs of those logits."""
    prompts = [p for p, _ in _groups(policy, [1, 1, 1])]
    logits, generate = [], policy.model.generate
    def spy(**kw):
        out = generate(**kw, output_logits=True, return_dict_in_generate=True)
        logits.append(torch.stack(out.logits, 1).float().cpu())              # (k n, T, V)
        return out.sequences
    monkeypatch.setattr(policy.model, "generate", spy)
    runs = {}
    for shared, top_k in itertools.product((False, True), (0, 1)):          # top_k 1: greedy
        torch.manual_seed(7)
        runs[shared, top_k] = sr.sample_completions(policy, prompts, 3, 1.3, top_p=1.0, top_k=top_k,
                                                    max_new_tokens=10, shared_prompt=shared)
    for top_k in (0, 1):
        assert [[c.tolist() for c in cs] for cs in runs[False, top_k]] == \
            [[c.tolist() for c in cs] for cs in runs[True, top_k]]
    assert (logits[2] - logits[0]).abs().max() < 1e-5                       # sampled: shared vs plain
    assert (logits[3] - logits[1]).abs().max() < 1e-5                       # greedy
    raw = logits[2] / 1.3
    raw[..., policy.vision_ids] = float("-inf")
    rows = [(p, c) for p, cs in zip(prompts, runs[True, 0]) for c in cs]
    logp, _ = sr.completion_logprobs(policy, policy.model, rows, 1.3)
    for i, (_, c) in enumerate(rows):
        expected = raw[i, :len(c)].log_softmax(-1).gather(-1, c[:, None]).squeeze(-1)
        assert torch.allclose(logp[i, :len(c)].cpu(), expected, atol=1e-5)


def test_grpo_update_moves_the_policy_only_when_rewards_differ(sample, policy, fresh_policy):
    """A stage update with unequal rewards changes the weights; with equal ones (pi = pi_ref) it cannot."""
    cfg = sr.Config(lr=1e-3, micro_batch=2)
    pol, reference = fresh_policy, policy.model
    texts = ["<think>a</think><answer>[]</answer>", "junk", "more junk", "<think>"]
    rows = _rows(pol, [sample] * 4, texts)
    for rewards, should_move in (([1.0, 1.0, 1.0, 1.0], False), ([3.0, 0.0, 0.0, 0.0], True)):
        group = sr.Group(1, rows[0][0], (112, 112), [c for _, c in rows], texts, [None] * 4,
                         rewards=[{"total": r} for r in rewards])
        before = [p.detach().clone() for p in pol.model.parameters()]
        opt = torch.optim.AdamW(pol.model.parameters(), lr=cfg.lr, weight_decay=0.0)
        stats = sr.grpo_update(pol, reference, opt, [group], cfg)
        moved = any(not torch.equal(b, p) for b, p in zip(before, pol.model.parameters()))
        assert moved == should_move and not stats["skipped"]
    # and the move raised the probability of the rewarded completion
    after, _ = sr.completion_logprobs(pol, pol.model, rows[:1], 1.0)
    start, _ = sr.completion_logprobs(pol, reference, rows[:1], 1.0)
    assert after.sum() > start.sum()


def test_sft_targets_are_the_ground_truth_in_each_stages_schema(policy, sample):
    """A.2.3: stage-1 target = the box of every region; stage 2 adds three points inside each region."""
    rng = np.random.default_rng(0)
    (in1, t1), (in2, t2) = sr.sft_examples(policy, sr.GrowSegmenter(), sample, 3, rng)
    end = policy.processor.tokenizer.eos_token_id
    assert int(t1[-1]) == end and int(t2[-1]) == end                    # the turn ends with <|im_end|>
    text1, text2 = sr.decode(policy, t1), sr.decode(policy, t2)
    gt_model = sr.to_frame(sr.mask_to_boxes(sample.mask), sample.mask.shape, (112, 112))
    assert reward1(text1, gt_model)["total"] == pytest.approx(3.0)
    a2 = sr.parse_answer(text2, 2)
    assert np.allclose([o["bbox_2d"] for o in a2], np.round(gt_model))
    _, points = sr.answer_prompts(a2, (112, 112), sample.mask.shape)
    assert all(len(p) == 3 and sample.mask[p[:, 1].astype(int), p[:, 0].astype(int)].all() for p in points)
    assert "Its boxes were: [[" in policy.processor.tokenizer.decode(in2["input_ids"][0])


def test_sft_target_points_land_on_the_target_once_written_in_whole_model_pixels(policy):
    """The model writes whole pixels of its (here 2x smaller) frame: every stage-2 target point of every
    held-out tile, as written and mapped back to the mask frame, is a pixel of the target."""
    rng = np.random.default_rng(0)
    for ref in sr.list_split(HERE / "data_sample", "val"):
        s = sr.read_sample(ref)
        target = sr.sft_examples(policy, sr.GrowSegmenter(), s, 3, rng)[1][1]             # stage-2 target ids
        answer = sr.parse_answer(sr.decode(policy, target), 2)
        _, points = sr.answer_prompts(answer, sr.model_frame(policy, s.sat.size), s.mask.shape)
        for p in points:
            assert s.mask[p[:, 1].astype(int), p[:, 0].astype(int)].all(), ref.id


def test_sft_target_points_spread_evenly_across_the_regions_middle_and_stay_on_it():
    """A 9 x 3 block (x 0-8, y 0-2): spots at a quarter, half and three quarters of its width on its middle
    row, (2, 1), (4, 1), (6, 1). An L (x 0-8 on y 0, and x 0 on y 1-8: 17 pixels, mean y 36 / 17 = 2.12):
    spots off the region give the nearest of its pixels: (2, 2.12) -> (0, 2) at 2.0, not (2, 0) at 2.12."""
    xs, ys = np.meshgrid(np.arange(9), np.arange(3))
    block = np.stack([xs.ravel(), ys.ravel()], 1)
    assert sr.evenly_inside(block, 3).tolist() == [[2, 1], [4, 1], [6, 1]]
    ell = np.array([[x, 0] for x in range(9)] + [[0, y] for y in range(1, 9)])
    assert sr.evenly_inside(ell, 3).tolist() == [[0, 2], [4, 0], [6, 0]]


def test_sft_targets_of_sub_pixel_regions_stay_well_formed():
    text = sr.format_answer([{"bbox_2d": np.array([12.2, 20.0, 12.4, 30.0]),
                              "points": np.array([[12.3, 25.0]])}])
    assert sr.parse_answer(text, 2) == [{"bbox_2d": [12, 20, 13, 30], "points": [[12, 25]]}]


def test_sft_step_lowers_the_loss_of_its_targets(sample, fresh_policy):
    pol = fresh_policy
    rows = sr.sft_examples(pol, sr.GrowSegmenter(), sample, 3, np.random.default_rng(0))
    opt = torch.optim.AdamW(pol.model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = [sr.sft_step(pol, opt, rows, micro_batch=1) for _ in range(5)]
    assert losses[-1] < losses[0] - 0.5


def test_a_non_finite_loss_is_skipped_not_applied(sample, policy, fresh_policy):
    """Numerical guard: a NaN anywhere in the loss leaves the weights untouched and is reported."""
    pol = fresh_policy
    broken = copy.deepcopy(policy.model)
    with torch.no_grad():
        broken.lm_head.weight[0, 0] = float("nan")                    # the reference's log-probs become NaN
    texts = ["<think>a</think><answer>[]</answer>", "junk"]
    rows = _rows(pol, [sample] * 2, texts)
    group = sr.Group(1, rows[0][0], (112, 112), [c for _, c in rows], texts, [None] * 2,
                     rewards=[{"total": 3.0}, {"total": 0.0}])
    before = [p.detach().clone() for p in pol.model.parameters()]
    opt = torch.optim.AdamW(pol.model.parameters(), lr=1e-3, weight_decay=0.0)
    stats = sr.grpo_update(pol, broken, opt, [group], sr.Config(micro_batch=2))
    assert stats["skipped"]
    assert all(torch.equal(b, p) for b, p in zip(before, pol.model.parameters()))


def test_random_3b_is_qwen25_vl_3b_with_its_processors_resize():
    # The published sizes: 36 x 2,048 language model, 32 x 1,280 ViT, 151,936 tokens, 3,754,622,976
    # parameters. Built on the meta device: the architecture without the 15 GB of weights.
    meta = torch.device("meta")
    with meta:
        pol = sr.build_random_policy(sr.QWEN25_VL_3B_ARCH, 0, meta)
    text, vision = pol.model.config.text_config, pol.model.config.vision_config
    assert (text.num_hidden_layers, text.hidden_size, text.intermediate_size) == (36, 2048, 11008)
    assert (text.num_attention_heads, text.num_key_value_heads, text.vocab_size) == (16, 2, 151936)
    assert (vision.depth, vision.hidden_size, vision.out_hidden_size) == (32, 1280, 2048)
    assert sum(p.numel() for p in pol.model.parameters()) == 3_754_622_976
    assert pol.model.lm_head.weight is pol.model.get_input_embeddings().weight           # tied, as released
    # a 768-px tile is resized to 756 px (27 x 27 merged patches): 729 image tokens per tile
    tile = Image.new("RGB", (768, 768))
    inputs, hw = sr.policy_inputs(pol, [tile, tile], pol.prompts["stage1"], "school")
    assert hw == (756, 756)
    assert int((inputs["input_ids"] == pol.model.config.image_token_id).sum()) == 2 * 729


def test_random_3b_samples_and_scores_with_fewer_layers():
    # The same architecture cut to one decoder layer and one ViT block (the full vocabulary and widths):
    # its completions are sampled and re-scored through the same code as the tiny model's.
    arch = dict(sr.QWEN25_VL_3B_ARCH)
    arch["text"] = dict(arch["text"], num_hidden_layers=1)
    arch["vision"] = dict(arch["vision"], depth=1, fullatt_block_indexes=[0])
    pol = sr.build_random_policy(arch, 0, CPU)
    tile = Image.new("RGB", (56, 56), (90, 120, 60))                   # the processor's smallest frame
    inputs, hw = sr.policy_inputs(pol, [tile, tile], pol.prompts["stage1"], "park")
    completions, = sr.sample_completions(pol, [inputs], 2, temperature=1.0, top_p=1.0, top_k=0,
                                         max_new_tokens=3)
    assert [len(c) for c in completions] == [3, 3]                      # no EOS from a random 151,936-way draw
    assert max(int(c.max()) for c in completions) < 151936
    logp, mask = sr.completion_logprobs(pol, pol.model, [(inputs, c) for c in completions], 1.0)
    assert logp.dtype == torch.float32 and mask.sum() == 6
    assert bool(torch.isfinite(logp).all()) and float(logp.detach().max()) < 0


def _shared_rollouts():
    """Hand-written rollouts of one stage, 3 groups of G = 2 (prompts of different lengths, unequal rewards),
    and 3 supervised rows; a policy and a different reference (so that the KL term has a gradient)."""
    samples = [sr.read_sample(r) for r in sr.list_split(HERE / "data_sample", "train")[:3]]
    pol = tiny_policy(seed=1)
    reference = tiny_policy(seed=2).model
    texts = ["<think>a</think><answer>[]</answer>", "x" * 9, "<think>bb</think>", "y", "zz" * 7, "<answer>"]
    rows = _rows(pol, [s for s in samples for _ in range(2)], texts)
    rewards = [[3.0, 0.0], [1.0, 2.5], [0.5, 0.0]]
    groups = [sr.Group(2, rows[2 * i][0], (112, 112), [c for _, c in rows[2 * i:2 * i + 2]],
                       texts[2 * i:2 * i + 2], [None] * 2,
                       rewards=[{"total": r, "format": float(r > 0), "accuracy": r / 3} for r in rewards[i]])
              for i in range(3)]
    return pol, reference, groups, rows[1:4]


def _weights(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _grpo_then_sft(pol, reference, groups, sft_rows) -> dict:
    """One GRPO update and one SFT update by SGD (AdamW's first step is about lr * sign(g): it would hide a
    gradient of the wrong scale); the weights after each, flattened, and the logged statistics."""
    opt = torch.optim.SGD(pol.model.parameters(), lr=0.1)
    update = sr.grpo_update(pol, reference, opt, groups, sr.Config(micro_batch=3, kl_beta=0.3))
    after_grpo = _weights(pol.model)
    sft_loss = sr.sft_step(pol, opt, sft_rows, micro_batch=1)
    return {"grpo": after_grpo, "sft": _weights(pol.model), "sft_loss": sft_loss,
            "stats": sr.step_stats({2: (groups, update)})}


def _one_of_two_processes(rank: int, store: str, out: str, rollouts: tuple):
    """A process of a 2-process gloo group, given the rollouts (and models) already built: this process's
    share of them (rank 0: one group and one SFT row, rank 1: two of each)."""
    torch.set_num_threads(1)                  # two processes on the CPU: no OpenMP team each
    # its own copy: spawned, the models arrive in memory shared with the parent and the other process
    pol, reference, groups, sft_rows = copy.deepcopy(rollouts)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    result = _grpo_then_sft(pol, reference, sr.shard(groups), sr.shard(sft_rows))
    torch.save(result, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_data_parallel_updates_equal_one_process_on_the_whole_batch(tmp_path):
    """torchrun's data parallelism: 2 processes with unequal shares of the same rollouts make the update one
    process makes on all of them (the loss normalised over the whole batch's completions), GRPO and SFT,
    and log the whole batch's statistics."""
    rollouts = _shared_rollouts()
    torch.multiprocessing.start_processes(_one_of_two_processes, nprocs=2, start_method=_start_method(),
                                          args=(str(tmp_path / "store"), str(tmp_path), rollouts))
    start = _weights(rollouts[0].model)
    alone = _grpo_then_sft(*rollouts)
    assert (alone["grpo"] - start).abs().max() > 1e-3 and (alone["sft"] - alone["grpo"]).abs().max() > 1e-3
    for rank in (0, 1):
        both = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for key in ("grpo", "sft"):
            assert (both[key] - alone[key]).abs().max() < 1e-6, (rank, key)
        assert both["sft_loss"] == pytest.approx(alone["sft_loss"], abs=1e-6)
        assert both["stats"].keys() == alone["stats"].keys()
        for k, v in alone["stats"].items():
            assert both["stats"][k] == pytest.approx(v, abs=1e-6), k


def test_tiny_policy_saves_and_loads_through_the_real_loading_path(policy, sample, tmp_path):
    policy.model.save_pretrained(tmp_path)
    policy.processor.save_pretrained(tmp_path)
    loaded = sr.load_policy(str(tmp_path), DEVICE)
    assert loaded.eos_ids == policy.eos_ids and loaded.vision_ids == policy.vision_ids
    inputs, _ = sr.policy_inputs(policy, [sample.map, sample.sat], sr.STAGE1_PROMPT, sample.text)
    inputs2, _ = sr.policy_inputs(loaded, [sample.map, sample.sat], sr.STAGE1_PROMPT, sample.text)
    assert torch.equal(inputs["input_ids"], inputs2["input_ids"])
    c = torch.tensor([65, 66, 67])
    a, _ = sr.completion_logprobs(policy, policy.model, [(inputs, c)], 1.0)
    b, _ = sr.completion_logprobs(loaded, loaded.model, [(inputs2, c)], 1.0)
    assert torch.allclose(a, b)


def test_a_missing_model_is_one_clear_line(tmp_path):
    with pytest.raises(sr.SocioError) as e:
        sr.load_policy(str(tmp_path / "nowhere"), CPU)
    assert "--model PATH" in str(e.value) and "--tiny" in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------------------
# eqs. 2, 5: the segmenter, and Algorithm 1's rollout with a fake one
# ------------------------------------------------------------------------------------------------------------

class BoxFiller:
    """A fake segmenter: each box becomes its filled rectangle; records what it was asked."""

    def __init__(self):
        self.calls, self.encoded = [], 0

    def encode(self, image):
        self.encoded += 1
        return {"hw": image.shape[:2]}

    def segment(self, encoding, boxes, points=None):
        self.calls.append((np.asarray(boxes).copy(), points))
        mask = np.zeros(encoding["hw"], bool)
        for x1, y1, x2, y2 in np.round(boxes).astype(int):
            mask[max(y1, 0):y2, max(x1, 0):x2] = True
        return mask


def completion_ids(policy, text):
    """A completion as sample_completions returns it: the text's token ids, then the EOS."""
    return torch.tensor(policy.processor.tokenizer(text)["input_ids"] + [policy.eos_ids[0]])


class ScriptedSampler:
    """Stands in for sample_completions: each stage-k prompt (told apart by its wording) is answered with the
    first n texts of script[k]. Records per call the prompts' stages and text, the sampling arguments, the
    policy asked and a copy of one of its weights (to tell which updates came before the call)."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def __call__(self, policy, prompts, n, **sampling):
        texts = [policy.processor.tokenizer.decode(p["input_ids"][0]) for p in prompts]
        stages = [2 if "first attempt" in t else 1 for t in texts]
        self.calls.append({"stages": stages, "prompts": texts, "sampling": sampling, "policy": policy,
                           "weight": policy.model.lm_head.weight.detach().clone()})
        return [[completion_ids(policy, t) for t in self.script[k][:n]] for k in stages]


def _write_rect_sample(d: Path, size, box, text="school"):
    """A sample of (W, H) = size pixels whose target is one rectangle, box [x1, y1, x2, y2] (mask frame)."""
    d.mkdir(parents=True)
    Image.new("RGB", size, (60, 120, 60)).save(d / "sat.png")
    Image.new("RGB", size, (230, 230, 220)).save(d / "map.png")
    m = np.zeros(size[::-1], np.uint8)
    m[box[1]:box[3], box[0]:box[2]] = 255
    Image.fromarray(m).save(d / "mask.png")
    (d / "question.json").write_text(json.dumps({"problem": text}))


def test_a_missing_sam_checkpoint_is_one_clear_line_naming_the_flag(tmp_path):
    """The real SAM 2 loading path (a local .pt that is not there) ends in one SocioError, not a traceback."""
    cfg = sr.Config(sam=str(tmp_path / "missing.pt"))
    with pytest.raises(sr.SocioError, match=r"cannot load SAM 2 .*missing\.pt.*--sam PATH"):
        sr.load_segmenter(cfg, torch.device("cpu"))


def test_sam2_segmenter_with_a_random_small_model(tiny_sam):
    seg = tiny_sam
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    b = rng.integers(0, 255, (50, 50, 3), dtype=np.uint8)
    enc_a = seg.encode(a)
    boxes = np.array([[5, 5, 40, 30], [50, 10, 70, 50], [10, 35, 30, 55]])
    points = [np.array([[10, 10]]), np.array([[60, 20], [65, 40]]), np.zeros((0, 2))]
    m1 = seg.segment(enc_a, boxes, points)
    assert m1.shape == (60, 80) and m1.dtype == bool
    seg.encode(b)                                                        # another tile in between
    assert np.array_equal(seg.segment(enc_a, boxes, points), m1)         # the stored encoding is reused
    # union of per-object masks: segmenting objects one by one and OR-ing gives the same mask
    union = np.zeros_like(m1)
    for i in range(3):
        union |= seg.segment(enc_a, boxes[i:i + 1], points[i:i + 1])
    assert np.array_equal(union, m1)
    assert not seg.segment(enc_a, np.zeros((0, 4))).any()               # no prompt, no SAM call, empty mask


def test_sam2_encodes_a_batch_of_tiles_in_one_pass_like_one_at_a_time(tiny_sam):
    seg = tiny_sam
    rng = np.random.default_rng(1)
    tiles = [rng.integers(0, 255, hw + (3,), dtype=np.uint8) for hw in ((60, 80), (50, 50))]
    calls = []
    hook = seg.predictor.model.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        together = sr.encode_tiles(seg, tiles)
    finally:
        hook.remove()
    assert len(calls) == 1 and len(together) == 2                          # one encoder pass for two tiles
    boxes, points = np.array([[5, 5, 40, 30], [20, 10, 45, 45]]), [np.array([[10, 10]]), np.array([[30, 20]])]
    for tile, enc in zip(tiles, together):
        alone = seg.encode(tile)
        assert torch.allclose(enc["_features"]["image_embed"], alone["_features"]["image_embed"], atol=1e-4)
        assert np.array_equal(seg.segment(enc, boxes, points), seg.segment(alone, boxes, points))
        assert seg.segment(enc, boxes, points).shape == tile.shape[:2]


def test_invalid_prompts_never_reach_the_segmenter():
    """Out-of-image geometry is clipped; a box with no area left is dropped, and with it its points."""
    seg = BoxFiller()
    enc = seg.encode(np.zeros((60, 80, 3), np.uint8))
    hw = (60, 80)
    outside = [{"bbox_2d": [100.0, 100.0, 120.0, 130.0]}, {"bbox_2d": [-1e300, -5.0, -1.0, 9.0]}]
    assert not sr.segment_answer(seg, enc, outside, hw, hw).any() and seg.calls == []
    partly = [{"bbox_2d": [-10.0, 5.0, 1e300, 30.0], "points": [[-5.0, 1e9], [3.0, 4.0]]},
              {"bbox_2d": [90.0, 0.0, 99.0, 9.0], "points": [[95.0, 5.0]]}]
    sr.segment_answer(seg, enc, partly, hw, hw)
    (boxes, points), = seg.calls
    assert boxes.tolist() == [[0, 5, 80, 30]] and points[0].tolist() == [[0, 59], [3, 4]]


def test_two_stage_rollout_converts_frames_and_carries_the_chosen_boxes(policy, sample):
    """Algorithm 1 lines 5-22 with a fake segmenter: model-frame answers reach S in the mask frame."""
    seg = BoxFiller()
    enc = seg.encode(np.asarray(sample.sat))
    model_hw, mask_hw = (112, 112), sample.mask.shape                    # tiles are 224 px: factor 2
    junk = [{"bbox_2d": [0.0, 0.0, 1.0, 1.0]}]
    carried = [{"bbox_2d": [10.0, 20.0, 30.0, 40.0]}, {"bbox_2d": [100.0, 100.0, 1e300, 200.0]}]
    g1 = sr.Group(1, {}, model_hw, [None] * 2, ["", ""], [junk, carried])
    sampling = dict(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=8)
    coarse = sr.segment_answer(seg, enc, g1.answers[1], model_hw, mask_hw)    # carry answer g* = 1
    g2, = sr.rollout(policy, 2, [sr.stage2_prompt(policy, sample, g1, 1, coarse)], 3, sampling)
    assert seg.calls[-1][0].tolist() == [[20, 40, 60, 80], [200, 200, 224, 224]]  # mask frame, clipped
    assert coarse.sum() == 40 * 40 + 24 * 24
    prompt = policy.processor.tokenizer.decode(g2.inputs["input_ids"][0])
    assert "[[10, 20, 30, 40], [100, 100, 112, 112]]" in prompt          # model frame, clipped to it
    assert len(g2.completions) == len(g2.texts) == len(g2.answers) == 3
    # stage 2 answers: box and points converted to the mask frame
    answer2 = [{"bbox_2d": [10.0, 20.0, 30.0, 40.0], "points": [[15.0, 25.0]]}]
    boxes, points = sr.answer_prompts(answer2, model_hw, mask_hw)
    assert boxes.tolist() == [[20, 40, 60, 80]] and points[0].tolist() == [[30, 50]]
    # the stage-1 reward compares in the model frame: ground truth scaled down by 2 matches itself exactly
    gt_model = sr.to_frame(sr.mask_to_boxes(sample.mask), mask_hw, model_hw)
    perfect = answer([{"bbox_2d": b} for b in gt_model.tolist()])
    assert reward1(perfect, gt_model)["total"] == pytest.approx(3.0)


def test_select_carried_argmax_and_sampled():
    rng = np.random.default_rng(0)
    assert sr.select_carried([0.0, 2.5, 1.0], "argmax", rng) == 1
    picks = [sr.select_carried([0.0, 2.0, 0.0], "sample", rng) for _ in range(2000)]
    share = np.mean(np.array(picks) == 1)
    assert share == pytest.approx(math.exp(2) / (math.exp(2) + 2), abs=0.03)   # proportional to exp(R1)


def test_train_step_runs_both_stages_with_a_fake_segmenter(policy, fresh_policy):
    refs = sr.list_split(HERE / "data_sample", "train")[:2]
    cfg = sr.Config(group_size=3, max_new_tokens=6, micro_batch=3, lr=1e-3)
    pol, reference = fresh_policy, policy.model
    opt = torch.optim.AdamW(pol.model.parameters(), lr=cfg.lr, weight_decay=0.0)
    seg = BoxFiller()
    stats = sr.train_step(0, refs, pol, reference, opt, seg, cfg)
    assert seg.encoded == 2                                           # one SAM encoding per sample per step
    assert set(stats) >= {"reward1", "reward2", "kl", "clipped", "skipped"}
    # the IoU of well-formed answers is NaN when a random policy writes none; everything else is finite
    assert all(np.isfinite(v) for k, v in stats.items() if k != "iou2")
    assert np.isfinite(stats["iou2"]) == (stats["format2"] > 0)


def test_train_step_on_hand_written_answers(policy, fresh_policy, tmp_path, monkeypatch):
    """Algorithm 1 with scripted completions, rewards computed by hand. The tile is 224 x 112 pixels, the
    model sees it as 140 x 56 (x / 1.6, y / 2); the target is the mask-frame box [32, 16, 160, 64], written
    by the model as [20, 8, 100, 32]. Pins: B* is converted to the model frame before R_1 (the authors'
    release compares it unconverted, and there this right answer would match nothing); g* = argmax R_1 is
    carried (its boxes listed to stage 2 in the model frame, segmented in the mask frame); stage 2 is
    sampled from the policy after the stage-1 update; --points-mu reaches R_2."""
    _write_rect_sample(tmp_path / "train" / "a", (224, 112), (32, 16, 160, 64))
    refs = sr.list_split(tmp_path, "train")
    assert sr.model_frame(policy, refs[0].size) == (56, 140)
    right = {"bbox_2d": [20, 8, 100, 32]}
    one_point = answer([{**right, "points": [[60, 20]]}])                    # mask frame (96, 40)
    sampler = ScriptedSampler({1: [answer([]), answer([right]), "no answer"],
                               2: [one_point, "junk", one_point]})
    monkeypatch.setattr(sr, "sample_completions", sampler)
    cfg = sr.Config(group_size=3, micro_batch=3, lr=1e-3, points_mu=1.0, temperature=0.7, rollout_top_p=0.99,
                    rollout_top_k=100)
    opt = torch.optim.AdamW(fresh_policy.model.parameters(), lr=cfg.lr, weight_decay=0.0)
    seg = BoxFiller()
    stats = sr.train_step(0, refs, fresh_policy, policy.model, opt, seg, cfg)
    # R_1 (J = 1): [] -> 1 + 0 + exp(-2); the right box -> 1 + 1 + 1; malformed -> 0
    assert stats["reward1"] == pytest.approx((1 + math.exp(-2) + 3 + 0) / 3)
    assert stats["format1"] == pytest.approx(2 / 3)
    # g* = 1: its box, converted, is M_c's prompt; the stage-2 prompt lists it as the model wrote it
    assert seg.calls[0][0].tolist() == [[32, 16, 160, 64]] and seg.calls[0][1] is None
    assert [c["stages"] for c in sampler.calls] == [[1], [2]]
    assert "Its boxes were: [[20, 8, 100, 32]]" in sampler.calls[1]["prompts"][0]
    # R_2: the box fills the target exactly (IoU 1); one point per group, r(1) = 1 at mu = 1 (exp(-1/8) at
    # the default mu = 2): [3, 0, 3]
    assert seg.calls[1][1][0].tolist() == [[96, 40]]
    assert stats["reward2"] == pytest.approx(2.0) and stats["iou2"] == 1.0
    # the rollouts sample at the training temperature, truncated as --rollout-top-p/--rollout-top-k say (here
    # the authors' release's 0.99 and 100); by default the whole softmax, as the paper does
    sampling = sampler.calls[0]["sampling"]
    assert (sampling["temperature"], sampling["top_p"], sampling["top_k"]) == (0.7, 0.99, 100)
    assert (sr.Config().rollout_top_p, sr.Config().rollout_top_k) == (1.0, 0)
    # stage 1 sampled from the start, stage 2 after the stage-1 update, then the stage-2 update
    start, before2 = sampler.calls[0]["weight"], sampler.calls[1]["weight"]
    assert torch.equal(start, policy.model.lm_head.weight)
    assert not torch.equal(before2, start) and not torch.equal(fresh_policy.model.lm_head.weight, before2)
    assert stats["skipped"] == 0


def test_no_shade_map_draws_only_the_boxes_on_the_map_in_every_stage2_prompt(sample, policy, monkeypatch):
    """Eq. 3 with --no-shade-map: the coarse mask is shaded on the satellite tile but not on the map (the
    demo's map carries position in its colours), in the warm-up's stage-2 rows and in training's and
    inference's stage-2 prompts; by default both tiles are shaded, as in the paper."""
    drawn = []                                                  # (which tile, shaded?) per render call
    render = sr.render
    def spy(image, boxes, mask, *args, **kwargs):
        drawn.append(("map" if image is sample.map else "sat", mask is not None))
        return render(image, boxes, mask, *args, **kwargs)
    monkeypatch.setattr(sr, "render", spy)
    right = {"bbox_2d": [10, 10, 40, 40]}
    sampler = ScriptedSampler({1: [answer([right])] * 2, 2: [answer([{**right, "points": [[20, 20]]}])] * 2})
    monkeypatch.setattr(sr, "sample_completions", sampler)
    ref = sr.list_split(HERE / "data_sample", "train")[:1]
    monkeypatch.setattr(sr, "read_sample", lambda r: sample)
    for shade in (True, False):
        drawn.clear()
        cfg = sr.Config(group_size=2, micro_batch=2, shade_map=shade, sft_batch=1)
        sr.warm_up_rows(sr.Run(cfg, {}, ref, [], policy, BoxFiller(), None), 0, {})
        trained = dataclasses.replace(policy, model=copy.deepcopy(policy.model))
        optimizer = torch.optim.SGD(trained.model.parameters(), lr=0.0)
        sr.train_step(0, ref, trained, policy.model, optimizer, BoxFiller(), cfg)
        sr.predict_batch(policy, BoxFiller(), [sample], cfg)
        assert drawn == [("map", shade), ("sat", True)] * 3, shade


def test_bench_times_a_step_from_outside_and_keeps_its_encodings_and_prompts(policy, fresh_policy):
    refs = sr.list_split(HERE / "data_sample", "train")[:2]
    cfg = sr.Config(group_size=3, max_new_tokens=6, micro_batch=3, lr=1e-3)
    pol = fresh_policy
    opt = torch.optim.AdamW(pol.model.parameters(), lr=cfg.lr, weight_decay=0.0)
    originals, times, calls = {name: getattr(sr, name) for name in sr.BENCH_KINDS}, {}, []
    with sr.timed_functions(times, calls):
        sr.train_step(0, refs, pol, policy.model, opt, BoxFiller(), cfg)
    assert {name: getattr(sr, name) for name in sr.BENCH_KINDS} == originals      # the functions are put back
    assert set(times) == set(sr.BENCH_KINDS.values()) and min(times.values()) > 0
    assert times["policy forward/backward"] > times["reference forward"]          # the first holds the second
    assert sum(len(args[1]) for name, args, _ in calls if name == "encode_tiles") == 2       # once per sample
    assert [len(args[1]) for name, args, _ in calls if name == "sample_completions"] == [2, 2]   # both stages


# ------------------------------------------------------------------------------------------------------------
# The command line, as a user runs it
# ------------------------------------------------------------------------------------------------------------

def run_cli(*args, cwd=HERE):
    return subprocess.run([sys.executable, str(HERE / "socioreasoner.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def run_here(*args, cwd=HERE):
    """run_cli in this process, without a new interpreter paying torch's import: the same exit code, stdout
    and stderr (a message the command exits with ends stderr). For what a command does, not the process."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            sr.main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
    if isinstance(code, str):
        err.write(code + "\n")
    return subprocess.CompletedProcess(args, int(bool(code)), out.getvalue(), err.getvalue())


QUICK = ["--tiny", "--rollout-batch", "2", "--group-size", "4", "--eval-split", "", "--save-every", "1"]


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory):
    """`sft --tiny` on two samples, long enough that the policy writes some well-formed answers, short enough
    that they still differ (a group whose answers all score alike has no advantage, and GRPO no update)."""
    data = tmp_path_factory.mktemp("data")
    sr.synthetic().make_synthetic_data(data, n_train=2, n_val=2, seed=5)
    out = tmp_path_factory.mktemp("sft")
    r = run_here("sft", "--tiny", "--data", str(data), "--sft-steps", "60", "--sft-batch", "2",
                 "--sft-lr", "3e-3", "--eval-split", "", "--out", str(out / "run"))
    assert r.returncode == 0, r.stderr
    return data, out / "run" / "checkpoint"


def test_cli_train_tiny_writes_log_and_checkpoint_and_resumes(tmp_path):
    out = tmp_path / "run"
    r = run_here("train", *QUICK, "--sft-steps", "2", "--steps", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    lines = log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [(l["phase"], l["step"]) for l in lines] == [("sft", 1), ("sft", 2), ("grpo", 1)]
    assert {"step", "reward1", "reward2", "kl", "seconds"} <= set(log[-1])
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert (state["phase"], state["step"]) == ("grpo", 1) and state["config"]["model"] == "tiny"
    assert state["reference"] == "warmup" and (out / "warmup" / "model.safetensors").exists()
    assert (out / "checkpoint" / "model.safetensors").exists()
    with pytest.raises(sr.SocioError, match="--resume"):                 # no silent overwrite
        sr.train(sr.Config(model="tiny", sam="grow", out=str(out), data=str(HERE / "data_sample")))
    r = run_here("train", *QUICK, "--sft-steps", "2", "--steps", "2", "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stdout
    lines = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [(l["phase"], l["step"]) for l in lines] == [("sft", 1), ("sft", 2), ("grpo", 1), ("grpo", 2)]


def test_resumed_run_repeats_the_uninterrupted_one(sft_checkpoint, tmp_path):
    """Checkpoint = weights + optimizer + RNG + step: the step after a resume is the one that would run."""
    data, ckpt = sft_checkpoint
    args = ["--tiny", "--model", str(ckpt), "--data", str(data), "--sft-steps", "0", "--rollout-batch", "2",
            "--group-size", "6", "--eval-split", "", "--lr", "1e-3"]
    assert run_here("train", *args, "--steps", "3", "--out", str(tmp_path / "a")).returncode == 0
    assert run_here("train", *args, "--steps", "1", "--out", str(tmp_path / "b")).returncode == 0
    r = run_here("train", *args, "--steps", "3", "--out", str(tmp_path / "b"), "--resume")
    assert r.returncode == 0, r.stderr
    a = [json.loads(l) for l in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    keys = ["reward1", "reward2", "loss1", "loss2", "kl"]
    assert [[x[k] for k in keys] for x in a] == [[x[k] for k in keys] for x in b]
    assert any(x["kl"] > 0 for x in a)              # the policy really was updated: the check is not vacuous


def test_a_run_killed_after_its_first_checkpoint_resumes_and_completes_its_log(tmp_path):
    """SIGKILL soon after the first checkpoint appears: --resume finishes the run, every step logged once."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(HERE / "socioreasoner.py"), "train", *QUICK, "--steps", "5",
           "--sft-steps", "3", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and sr.latest_checkpoint(out) is None:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.kill()                                                          # SIGKILL: no cleanup of any kind
    proc.wait()
    assert sr.latest_checkpoint(out) is not None
    r = run_here("train", *QUICK, "--steps", "5", "--sft-steps", "3", "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    steps = [(l["phase"], l["step"]) for l in sr.log_lines(out / "log.jsonl")]
    assert steps == [("sft", i) for i in range(1, 4)] + [("grpo", i) for i in range(1, 6)]


def test_torchrun_trains_on_two_cpu_processes_to_a_checkpoint_and_resumes(sft_checkpoint, tmp_path):
    """`torchrun --nproc-per-node 2 socioreasoner.py train`: SFT and GRPO steps over gloo, each process on
    half of the samples; one process prints, logs and checkpoints; --resume continues the run."""
    data, ckpt = sft_checkpoint
    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                str(HERE / "socioreasoner.py"), "train", "--tiny", "--model", str(ckpt), "--data", str(data),
                "--sft-steps", "2", "--sft-batch", "2", "--rollout-batch", "2", "--group-size", "4",
                "--lr", "1e-3", "--eval-split", "", "--out", str(out)]
    cpu_only = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}                  # on a GPU machine too
    for steps in ("1", "2 --resume"):
        r = subprocess.run(torchrun + ["--steps", *steps.split()], cwd=HERE, capture_output=True, text=True,
                           timeout=600, env=cpu_only)
        assert r.returncode == 0, r.stderr
        assert r.stdout.count(f"step    {steps[0]}/{steps[0]}") == 1              # printed by rank 0 only
    assert "resuming from" in r.stdout
    log = sr.log_lines(out / "log.jsonl")
    assert [(x["phase"], x["step"]) for x in log] == [("sft", 1), ("sft", 2), ("grpo", 1), ("grpo", 2)]
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert (state["phase"], state["step"]) == ("grpo", 2)
    assert log[-1]["kl"] > 0                     # step 1's combined update moved the policy away from pi_ref


def _start_method() -> str:
    """How the data-parallel tests start their 2 CPU processes: fork (fast: no imports again), unless this
    process has used CUDA, whose autograd threads and context a forked child cannot use; then spawn."""
    return "spawn" if torch.cuda.is_initialized() else "fork"


def test_torchrun_with_more_processes_than_gpus_is_one_line(monkeypatch):
    """`torchrun --nproc-per-node 2` on a one-GPU machine: process 1 says what to do, not CUDA's 'invalid
    device ordinal' from deep inside torch."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(sr.SocioError, match=r"process 1 on a machine with 1 GPU.*--nproc-per-node.*"
                                            r"CUDA_VISIBLE_DEVICES="):
        sr.join_processes("train")


def _train_as_one_of_two_processes(rank: int, store: str, runs: list):
    torch.set_num_threads(1)                  # two processes on the CPU: no OpenMP team each
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    for cfg in runs:
        sr.train(cfg)
    torch.distributed.destroy_process_group()


def test_resumed_data_parallel_run_repeats_the_uninterrupted_one(sft_checkpoint, tmp_path, monkeypatch):
    """2 processes (gloo, on the CPU): 2 GRPO steps in one go, and 1 step then --resume, log the same
    numbers: each process's rollouts are seeded by (seed, step, rank), so no random state needs saving."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")                  # a spawned child trains on the CPU
    data, ckpt = sft_checkpoint
    given = dict(model=str(ckpt), data=str(data), sft_steps=1, sft_batch=2, rollout_batch=2, group_size=4,
                 lr=1e-3, eval_split="")
    runs = [sr.command_config("train", True, {**given, "steps": 2, "out": str(tmp_path / "a")}),
            sr.command_config("train", True, {**given, "steps": 1, "out": str(tmp_path / "b")}),
            sr.command_config("train", True, {**given, "steps": 2, "out": str(tmp_path / "b"), "resume": True})]
    torch.multiprocessing.start_processes(_train_as_one_of_two_processes, nprocs=2,
                                          start_method=_start_method(), args=(str(tmp_path / "store"), runs))
    a, b = [sr.log_lines(tmp_path / run / "log.jsonl") for run in ("a", "b")]
    keys = ["loss", "reward1", "reward2", "loss1", "loss2", "kl", "tokens"]
    assert [[x.get(k) for k in keys] for x in a] == [[x.get(k) for k in keys] for x in b]
    assert [(x["phase"], x["step"]) for x in b] == [("sft", 1), ("grpo", 1), ("grpo", 2)]
    assert a[-1]["kl"] > 0                       # the policy really was updated: the check is not vacuous


def test_checkpoint_and_log_survive_a_kill_mid_write(tmp_path):
    # killed between the two renames of save_checkpoint: only checkpoint.old is complete
    (tmp_path / "checkpoint.old").mkdir()
    (tmp_path / "checkpoint.old" / "trainer_state.pt").write_bytes(b"x")
    (tmp_path / "checkpoint.tmp").mkdir()                                # half written, never used
    assert sr.latest_checkpoint(tmp_path) == tmp_path / "checkpoint.old"
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "phase": "grpo"}\n{"step": 2, "pha')      # killed mid-line
    assert sr.log_lines(log) == [{"step": 1, "phase": "grpo"}]


def test_cli_sft_checkpoint_is_accepted_by_infer(sft_checkpoint, tmp_path):
    data, ckpt = sft_checkpoint
    sat, mp = data / "val" / "val_0000" / "sat.png", data / "val" / "val_0000" / "map.png"
    r = run_here("infer", str(sat), str(mp), "school", "--tiny", "--model", str(ckpt), "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "--- stage 1 ---" in r.stdout and "--- stage 2 ---" in r.stdout
    mask = Image.open(tmp_path / "mask.png")
    assert mask.size == Image.open(sat).size and mask.mode == "L"
    overlay = Image.open(tmp_path / "overlay.png")                     # two tiles wide, two stages high,
    assert overlay.size[0] == 2 * mask.size[0] and overlay.size[1] > 2 * mask.size[1]   # plus text bands
    assert "random" not in r.stderr                                      # a trained model: no warning


def test_cli_infer_with_random_sam2(tmp_path):
    sat = HERE / "data_sample" / "val" / "val_0000" / "sat.png"
    mp = HERE / "data_sample" / "val" / "val_0000" / "map.png"
    r = run_here("infer", str(sat), str(mp), "park", "--tiny", "--sam", "tiny", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "mask.png").size == Image.open(sat).size
    assert "untrained, random" in r.stderr and "--tiny --model runs/demo/checkpoint" in r.stderr


def test_cli_infer_a_folder_of_tiles_in_batches(tmp_path):
    sr.synthetic().make_synthetic_data(tmp_path / "data", n_train=0, n_val=3, seed=2)
    tiles = tmp_path / "data" / "val"
    for d in tiles.iterdir():
        (d / "mask.png").unlink()                                        # no ground truth needed
    r = run_here("infer", str(tiles), "--tiny", "--generation-batch", "2", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    for d in tiles.iterdir():
        target = json.loads((d / "question.json").read_text())["problem"]
        assert f'{d.name}: "{target}"' in r.stdout
        mask = Image.open(tmp_path / "out" / d.name / "mask.png")
        assert mask.size == Image.open(d / "sat.png").size
        overlay = Image.open(tmp_path / "out" / d.name / "overlay.png")
        assert overlay.size[0] == 2 * mask.size[0] and overlay.size[1] > 2 * mask.size[1]   # + text bands
    r = run_here("infer", str(tiles / "val_0000" / "sat.png"), "--tiny")
    assert r.returncode != 0 and "SAT MAP TEXT" in r.stderr and "Traceback" not in r.stderr


def test_cli_errors_are_one_line(tmp_path):
    r = run_cli("infer", str(tmp_path / "nope.png"), str(tmp_path / "nope.png"), "park", "--tiny")
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0
    assert "nope.png" in r.stderr and "Traceback" not in r.stderr
    # the same, in this process: what the messages say
    msg = cli_error("train", "--tiny", "--data", str(tmp_path), "--out", str(tmp_path / "o"))
    assert "no split 'train'" in msg
    msg = cli_error("train", "--tiny", "--select", "best", "--group-size", "1")
    assert "--select" in msg and "--group-size" in msg


def cli_error(*args) -> str:
    """Run a command in this process; the one-line message it exits with."""
    with pytest.raises(SystemExit) as e:
        sr.main(list(args))
    assert isinstance(e.value.code, str) and "\n" not in e.value.code
    return e.value.code


def test_help_is_answered_before_transformers_is_imported_and_describes_every_flag():
    """--help costs torch's import (the method comes first in the file), never transformers' nor a model's."""
    code = ("import runpy, sys\nsys.argv = ['socioreasoner.py', 'train', '--help']\ntry:\n"
            "    runpy.run_path('socioreasoner.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('transformers imported:', 'transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert "--rollout-batch" in r.stdout and r.stdout.strip().endswith("transformers imported: False"), r.stderr
    for command in ("train", "sft", "infer", "eval", "bench", "make-data"):
        sub = sr.build_parser()._subparsers._group_actions[0].choices[command]
        text = sub.format_help()
        assert "{'" not in text and "(default )" not in text, command      # a dict; an empty default
        assert all(a.help for a in sub._actions), command                  # every flag has a line
    infer = sr.build_parser()._subparsers._group_actions[0].choices["infer"]
    helps = {a.dest: a.help for a in infer._actions}
    assert "grow" in helps["sam"] and "mask.png" in helps["out"] and "checkpoint" not in helps["out"]


def test_prompts_file_is_checked_and_replaces_only_the_keys_it_gives(tmp_path):
    def prompts(obj):
        path = tmp_path / "p.json"
        path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
        return sr.load_prompts(str(path))

    assert sr.load_prompts("") == sr.DEFAULT_PROMPTS
    got = prompts({"stage1": "Find {target} in the {w}x{h} images: <answer>[{{...}}]</answer>"})
    assert got["stage1"].startswith("Find {target}") and got["stage2"] == sr.STAGE2_PROMPT
    for bad, words in [({"stage3": "{target}"}, "unknown key 'stage3'"),
                       ({"stage1": "Find the place."}, "missing placeholder {target}"),
                       ({"stage2": "Refine {target}."}, "{boxes} or {boxes_json}"),
                       ({"single": "{target} at {x}"}, "unknown placeholder(s) {x}"),
                       ({"stage1": "{target} as [{\"bbox_2d\": ...}]"}, "literal braces are written {{ }}"),
                       ({"stage1": "{target} {"}, "not a format string"),
                       ({"stage1": 3}, "not a format string"),
                       ('["stage1"]', "JSON object"), ("{oops", "cannot read it as JSON")]:
        with pytest.raises(sr.SocioError, match=re.escape(words)) as e:
            prompts(bad)
        assert "\n" not in str(e.value)
    (tmp_path / "bad.json").write_text('{"stage0": "{target}"}')
    assert "unknown key 'stage0'" in cli_error("infer", "a.png", "b.png", "park", "--tiny", "--prompts",
                                               str(tmp_path / "bad.json"))       # before anything is read


def test_custom_prompts_reach_the_model_and_travel_with_the_checkpoint(sample, tmp_path):
    wording = {"stage1": "Boxes for {target}, please.", "stage2": "Refine {target}; first try: {boxes_json}."}
    (tmp_path / "p.json").write_text(json.dumps(wording))
    cfg = sr.Config(model="tiny", prompts=str(tmp_path / "p.json"), max_new_tokens=4)
    pol = sr.load_policy(cfg.model, DEVICE, cfg.seed, cfg.prompts)
    text = lambda inputs: pol.processor.tokenizer.decode(inputs["input_ids"][0])
    g1, = sr.rollout(pol, 1, [sr.stage1_prompt(pol, sample)], 1,
                     dict(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=4))
    assert f"Boxes for {sample.text}, please." in text(g1.inputs)
    stage2 = sr.stage2_inputs(pol, sample, np.array([[1, 2, 30, 40]]), (112, 112), sample.mask)
    assert f'Refine {sample.text}; first try: [{{"bbox_2d": [1, 2, 30, 40]}}].' in text(stage2)
    sr.save_checkpoint(tmp_path, pol, None, {"phase": "grpo", "step": 0, "reference": "tiny"}, cfg)
    assert sr.load_policy(str(tmp_path / "checkpoint"), CPU).prompts == {**sr.DEFAULT_PROMPTS, **wording}


def test_infer_refuses_bad_inputs_with_one_line(tmp_path):
    tile = HERE / "data_sample" / "val" / "val_0000"
    broken = tmp_path / "broken.png"
    broken.write_bytes((tile / "sat.png").read_bytes()[:2000])                   # cut off mid-file
    msg = cli_error("infer", str(broken), str(tile / "map.png"), "park", "--tiny", "--out",
                    str(tmp_path / "o"))
    assert "broken.png" in msg and "truncated" in msg
    assert "empty" in cli_error("infer", str(tile / "sat.png"), str(tile / "map.png"), "  ", "--tiny")
    msg = cli_error("infer", str(tile / "sat.png"), str(tile / "map.png"), "x" * 10_000, "--tiny")
    assert "10,000 characters" in msg and str(sr.MAX_TARGET_CHARS) in msg
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag, value, named", [
    ("--generation-batch", "-1", "--generation-batch"), ("--max-new-tokens", "0", "--max-new-tokens"),
    ("--infer-temperature", "0", "--infer-temperature"), ("--infer-top-p", "1.5", "--infer-top-p"),
    ("--infer-top-k", "-1", "--infer-top-k"), ("--seed", "-3", "--seed"), ("--limit", "-1", "--limit")])
def test_eval_and_infer_refuse_bad_values_naming_the_flag(flag, value, named, tmp_path):
    # before anything is loaded or written: a bad value never evaluates nothing and reports 100 %
    tile = HERE / "data_sample" / "val" / "val_0000"
    out = ["--out", str(tmp_path / "o"), "--model", "tiny", "--sam", "grow"]
    assert named in cli_error("eval", flag, value, *out)
    if flag != "--limit":                                                 # infer has no --limit
        assert named in cli_error("infer", str(tile / "sat.png"), str(tile / "map.png"), "school", flag, value,
                                  *out)
    assert not (tmp_path / "o").exists()


def test_train_does_not_take_the_inference_only_stage1_ablation(capsys):
    # training always trains both stages: --stage1-only (eval/infer's "w/o refinement") is refused, not ignored
    with pytest.raises(SystemExit) as e:
        sr.main(["train", "--tiny", "--stage1-only"])
    assert e.value.code == 2 and "--stage1-only" in capsys.readouterr().err
    assert sr.build_parser().parse_args(["eval", "--stage1-only"]).stage1_only is True     # where it belongs


def test_an_out_that_is_a_file_is_one_line(tmp_path):
    tile = HERE / "data_sample" / "val" / "val_0000"
    (tmp_path / "taken").write_text("")
    msg = cli_error("infer", str(tile / "sat.png"), str(tile / "map.png"), "school", "--model", "tiny",
                    "--sam", "grow", "--max-new-tokens", "2", "--out", str(tmp_path / "taken"))
    assert "taken" in msg and "exists" in msg


def test_a_big_tile_gets_a_scaled_overlay_and_a_full_size_mask(tmp_path):
    tile = HERE / "data_sample" / "val" / "val_0000"
    for name in ("sat", "map"):
        Image.open(tile / f"{name}.png").resize((1300, 1300)).save(tmp_path / f"{name}.png")
    sr.main(["infer", str(tmp_path / "sat.png"), str(tmp_path / "map.png"), "park", "--tiny",
             "--max-new-tokens", "8", "--out", str(tmp_path / "o")])
    assert Image.open(tmp_path / "o" / "mask.png").size == (1300, 1300)
    assert Image.open(tmp_path / "o" / "overlay.png").size[0] == 2048


def test_the_overlay_of_a_big_tile_scales_boxes_points_and_mask():
    """A 1300-pixel tile is drawn at 1024 pixels (x 1024/1300): the answers' boxes and points (model frame
    130: x 10 to the mask frame) and the masks are scaled with it. Panel: 42-pixel text lines, two above the
    stages, one above each stage's tiles; outlines 7 pixels wide (1024 / 150), points of radius 14."""
    sat = Image.new("RGB", (1300, 1300), (0, 0, 255))
    s = sr.Sample("big", "park", sat, sat.copy(), np.zeros((1300, 1300), bool))
    box = [65.0, 32.5, 130.0, 97.5]                                  # mask frame [650, 325, 1300, 975]
    g1 = sr.Group(1, {}, (130, 130), [None], [""], [[{"bbox_2d": box}]])
    g2 = sr.Group(2, {}, (130, 130), [None], [""], [[{"bbox_2d": box, "points": [[97.5, 65.0]]}]])
    coarse = np.zeros((1300, 1300), bool)
    coarse[325:975, 650:1300] = True                                 # drawn at [256:768, 512:1024]
    panel = np.asarray(sr.prediction_picture(s, sr.Prediction([(g1, coarse), (g2, coarse)], coarse)))
    assert panel.shape == (2 * 42 + 2 * (42 + 1024), 2048, 3)
    for col in (0, 1024):                                            # map, then satellite
        for top in (126, 1192):                                      # stage 1's tiles, then stage 2's
            px = lambda y, x: tuple(panel[top + y, col + x])
            assert px(258, 700) == px(765, 700) == sr.BOX_RGB        # box edges at y 256 and 768 (not 325)
            assert px(500, 515) == px(500, 1020) == sr.BOX_RGB       # at x 512 and 1024 (not 650)
            assert px(400, 700) == (102, 0, 153) and px(200, 700) == (0, 0, 255)   # shaded inside only
            assert px(780, 700) == (0, 0, 255)
        assert tuple(panel[1192 + 512, col + 768]) == sr.POINT_RGB   # stage 2's point: (975, 650) scaled
        assert tuple(panel[126 + 512, col + 768]) != sr.POINT_RGB    # stage 1 has none


def test_hub_models_fail_fast_offline_and_leave_no_run_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(sr, "hub_problem", lambda: "no answer from the hub (a test)")   # never asks the hub
    t0 = time.time()
    msg = cli_error("train", "--model", "socioreasoner-tests/no-such-model", "--sam", "grow", "--out",
                    str(tmp_path / "run"), "--eval-split", "")
    assert time.time() - t0 < 30 and not (tmp_path / "run").exists()
    assert "socioreasoner-tests/no-such-model" in msg and "HF_HUB_OFFLINE=1" in msg
    assert "--model PATH" in msg and "--tiny" in msg


def test_recovery_hints(tmp_path, monkeypatch):
    sr.synthetic().make_synthetic_data(tmp_path / "data", n_train=1, n_val=0)
    msg = cli_error("train", "--tiny", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"))
    assert "no split 'val'" in msg and "--eval-split ''" in msg and "--tiny" in msg
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(sr, "train", interrupted)
    assert "nothing to resume" in cli_error("train", "--tiny", "--out", str(tmp_path / "run"))
    assert sr.command_config("train", True, {}).out == "runs/demo"       # a demo never takes runs/train
    assert sr.command_config("sft", True, {"out": "x"}).out == "x"


BAD_VALUES = dict(select="best", group_size=1, rollout_batch=0, micro_batch=0, sft_batch=0, max_new_tokens=0,
                  save_every=0, steps=-1, sft_steps=-1, eval_limit=-1, generation_batch=-1, seed=-1,
                  infer_top_k=-1, temperature=0.0, infer_temperature=-0.5, infer_top_p=1.5, sft_points=0,
                  rollout_top_p=0.0, rollout_top_k=-1)


def test_check_config_names_each_bad_flag_in_one_line():
    """Each value that would fail deep inside a library is refused naming its flag; all at once, one line."""
    sr.check_config(sr.Config())
    flag = lambda name: "--" + name.replace("_", "-")
    for name, value in BAD_VALUES.items():
        with pytest.raises(sr.SocioError) as e:
            sr.check_config(sr.Config(**{name: value}))
        assert str(e.value).startswith(flag(name)) and "\n" not in str(e.value), name
    with pytest.raises(sr.SocioError, match="--single-stage and --stage1-only"):
        sr.check_config(sr.Config(single_stage=True, stage1_only=True))
    with pytest.raises(sr.SocioError) as e:
        sr.check_config(sr.Config(**BAD_VALUES))
    assert all(flag(name) in str(e.value) for name in BAD_VALUES) and "\n" not in str(e.value)
    # every command checks its config before loading anything, eval and infer included
    assert "--infer-top-p" in cli_error("eval", "--tiny", "--infer-top-p", "2")
    msg = cli_error("infer", "a.png", "b.png", "park", "--tiny", "--max-new-tokens", "0")
    assert "--max-new-tokens" in msg
    assert "--micro-batch" in cli_error("bench", "--tiny", "--micro-batch", "0")


def test_resumed_config_takes_the_flags_given_again_but_keeps_the_runs_own():
    saved = dataclasses.asdict(sr.Config(model="m0", seed=3, prompts="p.json", steps=10, lr=1e-5, out="o"))
    given = {"model": "m1", "seed": 9, "prompts": "", "steps": 20, "out": "o"}
    cfg = sr.command_config("train", False, given)
    again = sr.resumed_config(saved, cfg, set(given))
    assert (again.steps, again.lr, again.resume) == (20, 1e-5, True)            # given again; saved; resumed
    assert (again.model, again.seed, again.prompts) == ("m0", 3, "p.json")     # RUN_FIELDS stay as saved
    everything = sr.resumed_config(saved, cfg, None)                           # None: every field given
    assert (everything.steps, everything.lr, everything.model) == (20, 1e-6, "m0")


def test_make_data_writes_the_splits_it_is_asked_for(tmp_path):
    r = run_here("make-data", "--out", tmp_path, "--train", "2", "--val", "1", "--size", "64", "--seed", "3")
    assert r.returncode == 0 and f"wrote 2 train and 1 val samples to {tmp_path}" in r.stdout
    refs = sr.list_split(tmp_path, "train", need_foreground=True) + sr.list_split(tmp_path, "val")
    assert [ref.size for ref in refs] == [(64, 64)] * 3


def test_bench_runs_and_reports_each_kind_of_work(tmp_path):
    sr.synthetic().make_synthetic_data(tmp_path, n_train=2, n_val=0, seed=1)
    r = run_here("bench", "--tiny", "--data", tmp_path, "--bench-steps", "1", "--rollout-batch", "1",
                 "--group-size", "2", "--generation-batch", "2", "--max-new-tokens", "4",
                 "--micro-batch", "2", "--grad-checkpointing", "--freeze-vision")
    assert r.returncode == 0, r.stderr
    for words in ("generation", "segmentation", "rewards", "policy forward/backward", "reference forward",
                  "optimizer", "SAM image encodings per sample per step: 1.00", "peak memory",
                  "median of 3", "--generation-batch 2 ", "peak", "with 8; ratio"):
        assert words in r.stdout, words
    assert r.stdout.count("--generation-batch") == 1            # --generation-batch = G: one setting, timed


def test_bench_generation_reports_the_median_of_each_settings_own_runs(monkeypatch, capsys):
    """Three alternated runs of each setting, each setting's median; one setting when they are equal."""
    times, asked = iter([5.0, 1.0, 3.0, 2.0, 4.0, 6.0]), []
    def timed_call(generate, batch):
        asked.append(batch)
        return next(times), 100
    monkeypatch.setattr(sr, "timed_call", timed_call)
    sr.bench_generation([], 1, sr.Config(group_size=4, generation_batch=8))
    assert asked == [4, 8] * 3                                     # 4: runs 5, 3, 4 -> 4; 8: 1, 2, 6 -> 2
    out = capsys.readouterr().out
    assert "--generation-batch 4    (1 prompt(s) per call): 4.000 s per step, 25 tokens/s" in out
    assert "--generation-batch 8    (2 prompt(s) per call): 2.000 s per step, 50 tokens/s  2.00x" in out
    times, asked = iter([5.0, 1.0, 3.0]), []
    sr.bench_generation([], 1, sr.Config(group_size=4, generation_batch=4))
    out = capsys.readouterr().out
    assert asked == [4] * 3 and out.count("--generation-batch") == 1 and "3.000 s per step" in out


def test_grad_checkpointing_recomputes_activations_for_the_same_gradient(policy, sample):
    texts = ["<think>a</think><answer>[]</answer>", "junk"]
    rows = _rows(policy, [sample] * 2, texts)
    grads, forwards = [], []
    for on in (False, True):
        pol = dataclasses.replace(policy, model=copy.deepcopy(policy.model))
        sr.prepare_policy(pol, sr.Config(grad_checkpointing=on))
        pol.model.train()
        attention = pol.model.model.language_model.layers[0].self_attn     # inside a checkpointed layer
        calls = []
        hook = attention.register_forward_pre_hook(lambda *a: calls.append(1))
        advantages = torch.tensor([1.0, -1.0], device=pol.device)
        sr.accumulate_grpo_gradients(pol, policy.model, rows, advantages, sr.Config())
        hook.remove()
        forwards.append(len(calls))
        grads.append(torch.cat([p.grad.flatten() for p in pol.model.parameters() if p.grad is not None]))
    assert forwards == [1, 2]                       # checkpointed: the layer runs again in backward
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_a_run_is_asked_in_its_own_wording_through_warm_up_resume_and_report(policy, tmp_path, monkeypatch):
    """--prompts travels with the run (checkpoint/ and warmup/ carry prompts.json): a resumed run, its KL
    reference and its held-out report are asked in the run's wording even when the file given at the start
    has changed since. Also the default end of a --tiny run, the report, and --freeze-vision."""
    sr.synthetic().make_synthetic_data(tmp_path / "data", n_train=2, n_val=1, seed=4)
    wording = {"stage1": "Boxes for {target}, please.", "stage2": "Refine {target}; first try: {boxes}."}
    (tmp_path / "p.json").write_text(json.dumps(wording))
    seen, sample_completions = [], sr.sample_completions
    def recording(pol, prompts, n, **sampling):
        seen.extend(pol.processor.tokenizer.decode(p["input_ids"][0]) for p in prompts)
        return sample_completions(pol, prompts, n, **sampling)
    monkeypatch.setattr(sr, "sample_completions", recording)
    out = tmp_path / "run"
    args = ["--tiny", "--data", tmp_path / "data", "--sft-steps", "1", "--rollout-batch", "1",
            "--group-size", "2", "--max-new-tokens", "4", "--out", out]
    r = run_here("train", *args, "--steps", "1", "--eval-split", "", "--prompts", tmp_path / "p.json",
                 "--freeze-vision")
    assert r.returncode == 0, r.stderr
    (tmp_path / "p.json").write_text(json.dumps({"stage1": "Something else: {target}."}))
    r = run_here("train", *args, "--steps", "2", "--eval-split", "val", "--resume")   # then the report
    assert r.returncode == 0, r.stderr
    passes = sr.TINY_DEFAULTS["eval_passes"]            # the report: 5 rows x 2 stages, each pass, one tile
    assert len(seen) == 2 + 2 + 5 * 2 * passes
    assert all(t.count("Boxes for") + t.count("Refine") == 1 for t in seen)
    for folder in ("warmup", "checkpoint"):
        assert sr.load_policy(str(out / folder), CPU).prompts == {**sr.DEFAULT_PROMPTS, **wording}
    rows = json.loads((out / "eval.json").read_text())
    assert list(rows) == ["start of GRPO", "after GRPO", "after GRPO, blank tiles",
                          "after GRPO, shuffled tiles", "after GRPO, other kind named",
                          "blind: mean training box"]
    assert 0 <= rows["after GRPO, other kind named"]["original_gIoU"] <= 100
    assert all(row["n"] == (1 if name.startswith("blind") else passes) for name, row in rows.items())
    assert "held-out" in r.stdout and "blind: mean training box" in r.stdout
    trained = sr.load_policy(str(out / "checkpoint"), CPU).model        # --freeze-vision: the ViT as built
    assert all(torch.equal(a, b.cpu()) for a, b in zip(trained.model.visual.parameters(),
                                                       policy.model.model.visual.parameters()))
    assert not torch.equal(trained.lm_head.weight, policy.model.lm_head.weight.cpu())


# ------------------------------------------------------------------------------------------------------------
# §5: evaluation, and the paper's ablations as switches
# ------------------------------------------------------------------------------------------------------------

def test_cli_eval_metrics_agree_with_the_written_masks(sft_checkpoint, tmp_path):
    data, ckpt = sft_checkpoint
    # Nearly greedy (top-p 0.01: the most probable token): a sampled answer depends on the device's random
    # stream (on a GPU the sampler drew two malformed stage-1 answers, so no mask at all), the most probable
    # answer on the weights alone.
    r = run_here("eval", "--tiny", "--model", str(ckpt), "--data", str(data), "--split", "train",
                 "--infer-top-p", "0.01", "--pictures", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "cIoU" in r.stdout and "s per sample" in r.stdout and "stage-1 mask kept" in r.stdout
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert 0 <= m["stage2_fallbacks"] <= m["n"]
    refs = sr.list_split(data, "train")
    preds = [np.asarray(Image.open(tmp_path / "masks" / f"{ref.id}.png")) > 0 for ref in refs]
    gts = [sr.read_sample(ref).mask for ref in refs]
    again = sr.segmentation_metrics(preds, gts)
    assert any(p.any() for p in preds)            # the SFT model drew some masks: not all-empty to all-empty
    for k in ("cIoU", "gIoU", "F1", "n"):
        assert m[k] == pytest.approx(again[k])
    assert all((tmp_path / "pictures" / f"{ref.id}.png").exists() for ref in refs)


class TileRecorder(BoxFiller):
    """BoxFiller that keeps every tile it is asked to encode."""

    def encode(self, image):
        self.calls.append(np.asarray(image).copy())
        return super().encode(image)


def test_evaluate_batches_like_one_sample_at_a_time_and_counts_stage2_fallbacks(policy):
    refs = sr.list_split(HERE / "data_sample", "val")[:3]
    cfg = sr.Config(max_new_tokens=8, generation_batch=1)
    torch.manual_seed(0)
    m = sr.evaluate(policy, BoxFiller(), refs, cfg)
    torch.manual_seed(0)                                 # batch of one = the per-sample path, draw for draw
    preds = [sr.predict_batch(policy, BoxFiller(), [sr.read_sample(r)], cfg)[0] for r in refs]
    again = sr.segmentation_metrics([p.final for p in preds], [sr.read_sample(r).mask for r in refs])
    assert {k: m[k] for k in again} == again
    # a random policy writes no well-formed 8-token stage-2 answer: every final mask is stage 1's
    assert m["stage2_fallbacks"] == sum(p.fallback for p in preds) == 3
    # greedy decoding: all samples in one batch (left-padded prompts) predict what one at a time does
    greedy = sr.Config(max_new_tokens=8, infer_top_k=1)
    one = [sr.predict_batch(policy, BoxFiller(), [sr.read_sample(r)], greedy)[0] for r in refs]
    batched = sr.predict_batch(policy, BoxFiller(), [sr.read_sample(r) for r in refs], greedy)
    assert [g.texts for p in one for g, _ in p.stages] == [g.texts for p in batched for g, _ in p.stages]


def test_evaluate_delivers_the_stage1_mask_when_stage2_is_malformed(policy, tmp_path, monkeypatch):
    """Scripted answers on a 224-pixel tile (model frame 112: x / 2, y / 2) whose target is [32, 32, 96, 96]:
    stage 1 boxes its left half (IoU 1/2). A malformed stage-2 answer delivers that stage-1 mask (counted as
    a fallback); a well-formed empty one delivers an empty mask: the two cannot be told apart by an empty
    final mask."""
    _write_rect_sample(tmp_path / "val" / "a", (224, 224), (32, 32, 96, 96))
    refs = sr.list_split(tmp_path, "val")
    half = answer([{"bbox_2d": [16, 16, 32, 48]}])
    for stage2, final_iou, fallbacks in (("junk", 0.5, 1), (answer([]), 0.0, 0)):
        monkeypatch.setattr(sr, "sample_completions", ScriptedSampler({1: [half], 2: [stage2]}))
        m = sr.evaluate(policy, BoxFiller(), refs, sr.Config(), out=tmp_path / "out")
        assert m["stage1_gIoU"] == pytest.approx(50.0) and m["gIoU"] == pytest.approx(100 * final_iou)
        assert m["stage2_fallbacks"] == fallbacks and m["n"] == 1
        written = np.asarray(Image.open(tmp_path / "out" / "masks" / "a.png")) > 0
        assert written.sum() == fallbacks * 32 * 64 and written[32:96, 32:64].all() == bool(fallbacks)


def test_nothing_to_evaluate_is_one_line_and_writes_no_metrics(policy, tmp_path, monkeypatch):
    with pytest.raises(sr.SocioError, match="nothing to evaluate"):
        sr.evaluate(policy, BoxFiller(), [], sr.Config())
    assert "--limit cannot be negative" in cli_error("eval", "--tiny", "--limit", "-1")   # not "all but one"
    monkeypatch.setattr(sr, "list_split", lambda *args, **kwargs: [])
    assert "nothing to evaluate" in cli_error("eval", "--tiny", "--out", str(tmp_path))
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("images", ["real", "blank", "shuffled"])
def test_blank_and_shuffled_tiles_change_only_what_the_policy_sees(images, monkeypatch):
    """The held-out report's controls: the policy is shown grey tiles, or the next sample's (across batches,
    the last sample the first's); the segmenter, the target and the ground truth stay the sample's own."""
    refs = sr.list_split(HERE / "data_sample", "val")[:3]
    real = [sr.read_sample(r) for r in refs]
    shown = []
    def predict_batch(policy, segmenter, samples, cfg, encodings):      # what the policy would be shown
        shown.extend(samples)
        return [sr.Prediction([(None, s.mask)], s.mask) for s in samples]
    monkeypatch.setattr(sr, "predict_batch", predict_batch)
    seg = TileRecorder()
    m = sr.evaluate(None, seg, refs, sr.Config(generation_batch=2), images=images)
    assert m["gIoU"] == 100.0                                           # scored against each one's own mask
    assert len(seg.calls) == 3 and all(np.array_equal(a, np.asarray(s.sat)) for a, s in zip(seg.calls, real))
    assert len(shown) == 3
    for k, (seen, own) in enumerate(zip(shown, real)):
        assert (seen.id, seen.text) == (own.id, own.text) and np.array_equal(seen.mask, own.mask)
        source = own if images == "real" else real[(k + 1) % 3]
        for tile in ("sat", "map"):
            pixels = np.asarray(getattr(seen, tile))
            assert pixels.shape == np.asarray(own.sat).shape
            if images == "blank":
                assert (pixels == 128).all()
            else:
                assert np.array_equal(pixels, np.asarray(getattr(source, tile)))


def test_other_kind_named_is_scored_against_the_other_place_and_against_the_tiles_own_target(monkeypatch,
                                                                                           tmp_path):
    """The control that shows the text is read: the same tiles, the text naming the tile's other kind of
    place in the same form (class for class, function for function). A policy that finds what it is asked
    scores 100 against the other kind's place and 0 against the tile's own target (places never overlap)."""
    refs = sr.list_split(HERE / "data_sample", "val")[:4]
    real = [sr.read_sample(r) for r in refs]
    shown = []
    def predict_batch(policy, segmenter, samples, cfg, encodings):      # finds exactly what it is asked
        shown.extend(samples)
        return [sr.Prediction([(None, s.mask)], s.mask) for s in samples]
    monkeypatch.setattr(sr, "predict_batch", predict_batch)
    m = sr.evaluate(None, BoxFiller(), refs, sr.Config(), images="other kind")
    assert m["gIoU"] == 100.0 and m["original_gIoU"] == 0.0
    pairs = {"school": "park", "park": "school", "educational": "green space", "green space": "educational"}
    for seen, own in zip(shown, real):
        assert seen.text == pairs[own.text] and np.array_equal(np.asarray(seen.map), np.asarray(own.map))
        assert seen.mask.any() and not (seen.mask & own.mask).any()
    _write_rect_sample(tmp_path / "val" / "a", (40, 40), (0, 0, 20, 20))     # one place, not ours: refused
    with pytest.raises(sr.SocioError, match="sample a is not a tile with two kinds of place"):
        sr.evaluate(None, BoxFiller(), sr.list_split(tmp_path, "val"), sr.Config(), images="other kind")


def test_target_alone_takes_the_other_place_off_both_tiles():
    """The warm-up's curriculum tile: the other kind's place painted over with the map's background and its
    satellite tint removed; every other pixel, the text and the mask as they were."""
    gen = sr.synthetic()
    sat, map_img, mask, text = gen.make_synthetic_sample(np.random.default_rng(11))
    other = gen.other_kind(text, map_img)[1]
    alone_sat, alone_map = gen.target_alone(text, sat, map_img)
    assert gen.other_kind(text, alone_map) is None and gen.other_kind(text, map_img) is not None
    assert np.array_equal(np.asarray(alone_map)[other], gen._map_background(224)[other])
    assert np.array_equal(np.asarray(alone_map)[~other], np.asarray(map_img)[~other])
    assert np.array_equal(np.asarray(alone_sat)[~other], np.asarray(sat)[~other])
    ground = np.asarray(alone_sat)[other].astype(int)                      # grey speckle again: r = g = b
    assert (ground[:, 0] == ground[:, 1]).all() and (ground[:, 1] == ground[:, 2]).all()


def test_warm_up_curriculum_shows_the_target_alone_for_its_first_steps(tmp_path, monkeypatch):
    """--sft-curriculum 1: every tile is asked about both of its places, by name; in the first supervised
    step with the place asked about alone on the tile, in the second on the tile as it is. --sft-stage1-only
    1: the first step has stage-1 rows alone. Tiles with no other kind of place are refused, with the flag
    that trains without."""
    sr.synthetic().make_synthetic_data(tmp_path / "data", n_train=2, n_val=0, seed=3)
    seen, sizes, sft_examples, sft_step = [], [], sr.sft_examples, sr.sft_step
    def recording(policy, segmenter, sample, *args):
        seen.append(sample)
        return sft_examples(policy, segmenter, sample, *args)
    def counting(policy, optimizer, rows, micro_batch):
        sizes.append(len(rows))
        return sft_step(policy, optimizer, rows, micro_batch)
    monkeypatch.setattr(sr, "sft_examples", recording)
    monkeypatch.setattr(sr, "sft_step", counting)
    args = ["sft", "--tiny", "--sft-steps", "2", "--sft-batch", "2", "--sft-curriculum", "1", "--eval-split",
            "", "--sft-stage1-only", "1"]
    r = run_here(*args, "--data", tmp_path / "data", "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert sizes == [4, 8]                 # 2 tiles x 2 names: stage 1 alone, then both stages
    others = [sr.synthetic().other_kind(s.text, s.map) for s in seen]
    assert len(seen) == 8 and others[:4] == [None] * 4 and None not in others[4:]
    tiles = [sr.read_sample(r) for r in sr.list_split(tmp_path / "data", "train")]
    asked = {(s.text, s.mask.tobytes()) for s in seen[4:]}      # each tile about both places, by name
    assert asked == {(t, m.tobytes()) for s in tiles for t, m in [(s.text, s.mask),
                                                                  sr.synthetic().other_kind(s.text, s.map)]}
    _write_rect_sample(tmp_path / "plain" / "train" / "a", (40, 40), (0, 0, 20, 20))
    r = run_here(*args, "--data", tmp_path / "plain", "--out", tmp_path / "run2")
    assert r.returncode == 1 and "sample a is not a tile with two kinds" in r.stderr
    assert "--sft-curriculum 0" in r.stderr


def test_warm_up_keeps_a_tiles_stage1_rows_and_learns_exactly_as_when_it_rebuilds_them(tmp_path, monkeypatch):
    """A tile's stage-1-only rows draw nothing at random, so the warm-up keeps them: 2 tiles seen in 6 steps
    (3 alone, 3 as they are) are made twice (once per curriculum phase), and the losses equal those of a
    warm-up that rebuilds every row."""
    sr.synthetic().make_synthetic_data(tmp_path / "data", n_train=2, n_val=0, seed=3)
    args = ["sft", "--tiny", "--sft-steps", "6", "--sft-batch", "2", "--sft-curriculum", "3", "--eval-split",
            "", "--sft-stage1-only", "6", "--data", tmp_path / "data"]
    made, sft_examples, warm_up_rows = [], sr.sft_examples, sr.warm_up_rows
    def counting(*args):
        made.append(1)
        return sft_examples(*args)
    monkeypatch.setattr(sr, "sft_examples", counting)
    assert run_here(*args, "--out", tmp_path / "kept").returncode == 0
    assert len(made) == 2 * 2 * 2                  # tiles x names x phases
    monkeypatch.setattr(sr, "warm_up_rows", lambda run, step, kept: warm_up_rows(run, step, {}))
    assert run_here(*args, "--out", tmp_path / "rebuilt").returncode == 0
    assert len(made) == 8 + 6 * 2 * 2
    losses = [[r["loss"] for r in sr.log_lines(tmp_path / out / "log.jsonl")] for out in ("kept", "rebuilt")]
    assert len(losses[0]) == 6 and losses[0] == losses[1]


def test_held_out_report_rows_controls_blind_baseline_and_eval_json(policy, tmp_path, monkeypatch, capsys):
    """After training: the start of GRPO, the trained policy on real, blank and shuffled tiles, and the
    blind baseline: the training split's mean relative box, here [0.25, 0.25, 0.75, 0.75] of two 40-pixel
    tiles, which on the 80-pixel held-out tile is exactly its target [20, 20, 60, 60]."""
    _write_rect_sample(tmp_path / "train" / "a", (40, 40), (0, 0, 20, 20))
    _write_rect_sample(tmp_path / "train" / "b", (40, 40), (20, 20, 40, 40))
    _write_rect_sample(tmp_path / "val" / "c", (80, 80), (20, 20, 60, 60))
    train_refs, refs = sr.list_split(tmp_path, "train"), sr.list_split(tmp_path, "val")
    # the policies answer [20, 20, 60, 60] x 84 / 80 in stage 1 (IoU 1), junk in stage 2 (a fallback)
    sampler = ScriptedSampler({1: [answer([{"bbox_2d": [21, 21, 63, 63]}])], 2: ["junk"]})
    monkeypatch.setattr(sr, "sample_completions", sampler)
    cfg = sr.Config(out=str(tmp_path), data=str(tmp_path), eval_split="val")
    start = dataclasses.replace(policy)
    sr.held_out_report(cfg, train_refs, refs, policy, start, BoxFiller())
    rows = json.loads((tmp_path / "eval.json").read_text())
    names = ["start of GRPO", "after GRPO", "after GRPO, blank tiles", "after GRPO, shuffled tiles",
             "blind: mean training box"]
    assert list(rows) == names
    assert rows["blind: mean training box"] == {"cIoU": 100.0, "gIoU": 100.0, "F1": 100.0, "n": 1}
    assert all(rows[name]["gIoU"] == 100.0 and rows[name]["stage2_fallbacks"] == 1 for name in names[:4])
    assert sampler.calls[0]["policy"] is start and sampler.calls[2]["policy"] is policy   # the first row
    table = capsys.readouterr().out
    assert "held-out" in table and all(name in table for name in names) and "1 of 1" in table
    sr.held_out_report(cfg, train_refs, refs, policy, None, BoxFiller())        # no GRPO steps: after SFT
    rows = json.loads((tmp_path / "eval.json").read_text())
    assert list(rows)[:2] == ["after SFT", "after SFT, blank tiles"]


def test_sft_lr_falls_on_a_cosine_to_its_end_fraction(tmp_path, monkeypatch):
    """--sft-lr-end e: the supervised lr of step s is sft_lr (e + (1 - e)(1 + cos(pi s / N)) / 2), from
    sft_lr at the first step to e sft_lr at the (never taken) step N; e = 1 keeps it constant, exactly."""
    cfg = sr.Config(sft_lr=1e-3, sft_lr_end=0.5, sft_steps=4)
    assert [sr.sft_lr_at(cfg, s) for s in range(5)] == pytest.approx(
        [1e-3, 0.9268e-3, 0.75e-3, 0.5732e-3, 0.5e-3], abs=1e-7)
    assert {sr.sft_lr_at(dataclasses.replace(cfg, sft_lr_end=1.0), s) for s in range(5)} == {1e-3}
    seen, sft_step = [], sr.sft_step
    def recording(policy, optimizer, rows, micro_batch):
        seen.append(optimizer.param_groups[0]["lr"])
        return sft_step(policy, optimizer, rows, micro_batch)
    monkeypatch.setattr(sr, "sft_step", recording)
    sr.synthetic().make_synthetic_data(tmp_path / "data", n_train=2, n_val=1, seed=4)
    r = run_here("sft", "--tiny", "--data", tmp_path / "data", "--sft-steps", "4", "--sft-batch", "1",
                 "--eval-split", "", "--out", tmp_path / "run")                 # --tiny: --sft-lr-end 0.5
    assert r.returncode == 0, r.stderr
    assert seen == pytest.approx([1e-3, 0.9268e-3, 0.75e-3, 0.5732e-3], abs=1e-7)


def test_report_rows_average_their_passes_drawn_with_the_same_seeds(monkeypatch):
    """--eval-passes K: a row of the held-out report is the mean of K sampled passes, pass k drawing from the
    same seed in every row (two rows differ by their policies, not their draws); n and the stage-2
    fallbacks are summed over the passes."""
    def one_pass(policy, segmenter, refs, cfg, images="real"):          # scores its first random draw
        return {"gIoU": 100 * torch.rand(()).item(), "n": len(refs), "stage2_fallbacks": 1}
    monkeypatch.setattr(sr, "evaluate", one_pass)
    cfg = sr.Config(eval_passes=3, seed=5)
    start = sr.evaluate_passes("start", None, ["t1", "t2"], cfg)
    torch.manual_seed(123)                                              # whatever ran in between
    after = sr.evaluate_passes("after", None, ["t1", "t2"], cfg, images="blank")
    assert start == after
    draws = []
    for k in range(3):
        torch.manual_seed(int(np.random.SeedSequence([5, k]).generate_state(1)[0]))
        draws.append(100 * torch.rand(()).item())
    assert len(set(draws)) == 3 and start["gIoU"] == pytest.approx(np.mean(draws))
    assert start["n"] == 6 and start["stage2_fallbacks"] == 3


def test_ablation_single_stage_trains_and_predicts_with_one_answer(sample, policy, fresh_policy):
    """'w/o reflection': one prompt, boxes and points in one answer, rewarded like stage 2."""
    cfg = sr.Config(group_size=3, max_new_tokens=6, micro_batch=3, lr=1e-3, single_stage=True,
                    infer_top_k=0, infer_top_p=1.0)
    pol = fresh_policy
    opt = torch.optim.AdamW(pol.model.parameters(), lr=cfg.lr, weight_decay=0.0)
    refs = sr.list_split(HERE / "data_sample", "train")[:2]
    stats = sr.train_step(0, refs, pol, policy.model, opt, BoxFiller(), cfg)
    assert "reward2" in stats and "reward1" not in stats
    rows = sr.sft_examples(pol, BoxFiller(), sample, 3, np.random.default_rng(0), single_stage=True)
    assert len(rows) == 1 and sr.parse_answer(sr.decode(pol, rows[0][1]), 2)
    assert "give its box and points" in pol.processor.tokenizer.decode(rows[0][0]["input_ids"][0])
    pred = sr.predict_batch(pol, BoxFiller(), [sample], cfg)[0]
    assert len(pred.stages) == 1 and pred.stages[0][0].stage == 2


def test_ablation_stage1_only_stops_after_localisation(policy, sample):
    """'w/o refinement': the stage-1 mask is the final mask."""
    cfg = sr.Config(max_new_tokens=6, stage1_only=True)
    pred = sr.predict_batch(policy, BoxFiller(), [sample], cfg)[0]
    assert len(pred.stages) == 1 and pred.stages[0][0].stage == 1 and pred.final is pred.stages[0][1]
    full = sr.predict_batch(policy, BoxFiller(), [sample], sr.Config(max_new_tokens=6))[0]
    assert [g.stage for g, _ in full.stages] == [1, 2]


def test_ablation_points_mu_moves_the_peak_of_the_length_reward():
    gt = np.ones((4, 4), bool)
    one_point = answer([{"bbox_2d": [0, 0, 4, 4], "points": [[1, 1]]}])
    assert reward2(one_point, gt, gt, mu=1)["length"] == pytest.approx(1.0)
    assert reward2(one_point, gt, gt, mu=3)["length"] == pytest.approx(math.exp(-4 / 8))


def test_cli_ablation_flags_run_end_to_end(tmp_path):
    r = run_here("train", *QUICK, "--sft-steps", "2", "--steps", "1", "--single-stage", "--select", "sample",
                 "--points-mu", "1", "--out", str(tmp_path / "single"))
    assert r.returncode == 0, r.stderr
    state = torch.load(tmp_path / "single" / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["config"]["single_stage"] and state["config"]["points_mu"] == 1.0
    sat = HERE / "data_sample" / "val" / "val_0001" / "sat.png"
    mp = HERE / "data_sample" / "val" / "val_0001" / "map.png"
    r = run_here("infer", str(sat), str(mp), "park", "--tiny", "--stage1-only", "--out", str(tmp_path / "i"))
    assert r.returncode == 0, r.stderr
    assert "--- stage 1 ---" in r.stdout and "--- stage 2 ---" not in r.stdout
    r = run_here("eval", "--tiny", "--single-stage", "--limit", "2", "--out", str(tmp_path / "e"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["method"] == "w/o reflection"


# ------------------------------------------------------------------------------------------------------------
# The GPU path on a machine without one: a stand-in device
# ------------------------------------------------------------------------------------------------------------
# On a GPU the usual failure is a tensor there meeting one left on the CPU ("Expected all tensors to be on the
# same device"), which no CPU run can show. Inside `working_on(STAND_IN)`, torch.device("meta") plays the GPU:
# a tensor made on it or moved to it is an OffCpu tensor, which reports device meta and keeps real values in
# a CPU tensor. Each operation checks CUDA's rule on devices, then computes on the CPU exactly what the CPU
# would, so whole paths run (.item(), get_rope_index, generate, backward, AdamW) and can be compared with it.
# Why not the alternatives: torch's FakeTensorMode and plain meta tensors check the rule but hold no values
# (.item(), nonzero and tolist raise); a tensor claiming "cuda" cannot go through backward without a driver
# (autograd asks its device for a CUDA stream); meta is the one other device torch runs without hardware.
# Where the stand-in is not a GPU: no autocast (a test below uses the CPU's); CPU scalars may meet it in
# every operation (CUDA: most); transformers' generate does not move a CPU prompt to a meta model for you.

STAND_IN = torch.device("meta")
aten = torch.ops.aten
MAY_MIX = {aten.copy_.default, aten._to_copy.default}               # the copies between devices themselves
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


class OffCpu(torch.Tensor):
    """A tensor on STAND_IN whose values are the CPU tensor `.values` (same shape, strides and dtype)."""

    @staticmethod
    def __new__(cls, values):
        return torch.Tensor._make_wrapper_subclass(cls, values.shape, strides=values.stride(),
                                                   storage_offset=values.storage_offset(),
                                                   dtype=values.dtype, device=STAND_IN)

    def __init__(self, values):
        self.values = values

    def tolist(self):                                       # the one read that torch does not dispatch
        return self.values.tolist()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return run_on_stand_in(func, args, kwargs or {})


def values_of(t):
    return t.values if isinstance(t, OffCpu) else t


def check_one_device(func, args, tensors):
    """CUDA's rule: a GPU tensor meets a CPU one only as a 0-dim scalar, in a copy between the two, or as an
    index of an indexing op (CUDA moves the index over)."""
    if func in MAY_MIX or not any(isinstance(t, OffCpu) for t in tensors):
        return
    indices = args[1] if func in INDEXING else []
    on_cpu = [t for t in tensors
              if not isinstance(t, OffCpu) and t.dim() > 0 and not any(t is i for i in indices)]
    if on_cpu:
        raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                           f"{STAND_IN.type} and cpu! ({func})")


def run_on_stand_in(func, args, kwargs):
    """One aten operation; its results are on STAND_IN if asked for (device=) or if an input is there."""
    tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if any(t.is_meta and not isinstance(t, OffCpu) for t in tensors):   # made where StandInData missed it
        raise RuntimeError(f"a meta tensor without values reached {func}")
    check_one_device(func, args, tensors)
    if kwargs.get("device") is None:
        off_cpu = any(isinstance(t, OffCpu) for t in tensors)
    else:
        off_cpu = torch.device(kwargs["device"]).type == STAND_IN.type
        kwargs = {**kwargs, "device": CPU}
    given = {id(values_of(t)): t for t in tensors}
    out = func(*tree_map(values_of, args), **tree_map(values_of, kwargs))

    def placed(t):
        if isinstance(t, torch.Tensor) and id(t) in given:    # in place (add_, copy_, out=): the input itself
            return given[id(t)]
        return OffCpu(t) if isinstance(t, torch.Tensor) and off_cpu else t
    return tree_map(placed, out)


class StandInOperations(TorchDispatchMode):
    """Every aten operation, factories and .to() of CPU tensors included."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return run_on_stand_in(func, args, kwargs or {})


class StandInData(TorchFunctionMode):
    """What torch builds from Python data below any dispatch, as a meta tensor without values, is built on
    the CPU instead: torch.tensor(data, device=meta) and its kin (then moved; stand-in scalars in the data
    are read), and the index tensor of x[..., [1, 2]] (a CPU index, which CUDA takes too)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
            args = (args[0], cpu_index(args[1]), *args[2:])
        elif func in (torch.tensor, torch.as_tensor, torch.asarray):
            data = args[0]
            device = kwargs.get("device") or (data.device if isinstance(data, torch.Tensor) else CPU)
            return func(*tree_map(values_of, args), **{**kwargs, "device": CPU}).to(device)
        return func(*args, **kwargs)


def cpu_index(index):
    if isinstance(index, tuple):
        return tuple(cpu_index(i) for i in index)
    return torch.tensor(index) if isinstance(index, list) else index


@contextlib.contextmanager
def working_on(device):
    """Code in this block may use STAND_IN; a real device needs nothing. Attention runs torch's plain kernel
    on both: the CPU's fused one is chosen by device type, and the stand-in would differ by rounding."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        if device != STAND_IN:
            yield
            return
        with StandInData(), StandInOperations():
            yield


def moved(policy, device):
    """A tiny policy moved by socioreasoner's own make_policy (built on the CPU: slow on the stand-in)."""
    return sr.make_policy(policy.model, policy.processor, device)


def prompts_on_the_cpu(inputs: dict) -> bool:
    return all(v.device == CPU for v in inputs.values())


def test_the_stand_in_device_computes_real_values_and_refuses_what_cuda_refuses():
    with working_on(STAND_IN):
        x = torch.arange(6.0).view(2, 3).to(STAND_IN)                      # (2, 3)
        assert x.device == STAND_IN and x.sum().item() == 15.0
        assert (x * torch.tensor(2.0)).tolist() == [[0, 2, 4], [6, 8, 10]]   # a CPU scalar may meet it
        x[torch.tensor([1])] = -1.0                                          # and CPU indices
        assert x.cpu().tolist() == [[0, 1, 2], [-1, -1, -1]] and x.cpu().device == CPU
        assert x[..., [0, 2]].tolist() == [[0, 2], [-1, -1]]
        for mixed in (lambda: x * torch.ones(3), lambda: torch.cat([x, torch.zeros(1, 3)])):
            with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
                mixed()
        assert torch.tensor([1.5], device=STAND_IN).tolist() == [1.5]
        layer = torch.nn.Linear(3, 1).to(STAND_IN)
        layer(x).sum().backward()
        assert layer.weight.grad.device == STAND_IN
        assert layer.weight.grad.tolist() == [[-1.0, 0.0, 1.0]]



def test_a_grpo_update_runs_on_a_gpu_and_moves_the_weights_as_on_the_cpu(sample):
    """Eq. 6 multiplies the advantages, (B*G, 1), with log-probs on the policy's device: made anywhere else,
    they end a GPU run at its first update. The prompt tensors stay on the CPU, moved when scored."""
    texts = ["<think>a</think><answer>[]</answer>", "junk", "more junk", "<think>"]
    weights, kls = {}, {}
    for device in (CPU, STAND_IN):
        built, reference = tiny_policy(seed=0), tiny_policy(seed=1).model
        with working_on(device):
            pol = moved(built, device)
            rows = _rows(pol, [sample] * 4, texts)
            group = sr.Group(1, rows[0][0], (112, 112), [c for _, c in rows], texts, [None] * 4,
                             rewards=[{"total": r} for r in (3.0, 0.0, 1.0, 0.0)])
            opt = torch.optim.AdamW(pol.model.parameters(), lr=1e-3, weight_decay=0.0)
            stats = sr.grpo_update(pol, reference.to(device), opt, [group], sr.Config(micro_batch=3))
            assert not stats["skipped"] and prompts_on_the_cpu(group.inputs)
            weights[device] = [p.detach().cpu() for p in pol.model.parameters()]
            kls[device] = stats["kl"]
    assert kls[STAND_IN] == kls[CPU] > 0
    assert all(torch.equal(a, b) for a, b in zip(weights[CPU], weights[STAND_IN]))


def test_an_sft_step_runs_on_a_gpu_with_its_prompts_kept_on_the_cpu(sample):
    """A prompt's pixel_values (~27 MB at 756 px) stay in host memory: the SFT step moves what it scores."""
    losses = {}
    for device in (CPU, STAND_IN):
        built = tiny_policy(seed=0)
        with working_on(device):
            pol = moved(built, device)
            rows = sr.sft_examples(pol, sr.GrowSegmenter(), sample, 3, np.random.default_rng(0))
            assert all(prompts_on_the_cpu(inputs) for inputs, _ in rows)
            opt = torch.optim.AdamW(pol.model.parameters(), lr=3e-3, weight_decay=0.0)
            losses[device] = [sr.sft_step(pol, opt, rows, micro_batch=1) for _ in range(2)]
    assert losses[STAND_IN] == losses[CPU] and losses[CPU][1] < losses[CPU][0]


def test_gradient_accumulation_runs_on_a_gpu(sample, monkeypatch):
    """Advantages on the policy's device: accumulated over micro-batches there, the gradient is the CPU's.
    bench's accumulation check draws its own advantages: there too."""
    texts = ["<think>a</think><answer>[]</answer>", "x" * 9, "<think>bb</think>", "y"]
    grads = {}
    for device in (CPU, STAND_IN):
        built, reference = tiny_policy(seed=0), tiny_policy(seed=1).model
        with working_on(device):
            pol = moved(built, device)
            rows = _rows(pol, [sample] * 4, texts)
            adv = torch.tensor([0.5, -1.0, 2.0, -1.5], device=device)
            sr.accumulate_grpo_gradients(pol, reference.to(device), rows, adv,
                                         sr.Config(micro_batch=3, kl_beta=0.3))
            grads[device] = torch.cat([p.grad.flatten().cpu() for p in pol.model.parameters()])
    assert grads[CPU].abs().max() > 0 and torch.equal(grads[STAND_IN], grads[CPU])
    devices = []                                               # where bench's accumulations get them
    monkeypatch.setattr(sr, "accumulate_grpo_gradients", lambda *args: devices.append(args[3].device))
    with working_on(STAND_IN):                                 # pol, rows: the stand-in's, from the loop
        sampling = dict(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=2)
        sr.bench_accumulation(pol, None, sr.new_optimizer(pol, 1e-3), ((pol, [rows[0][0]], 2), sampling),
                              sr.Config(micro_batch=1))
    assert devices == [STAND_IN, STAND_IN]


def test_evaluation_runs_on_a_gpu_like_on_the_cpu(monkeypatch):
    """Both stages sampled, segmented and scored with the policy on the device, its prompts on the CPU."""
    refs = sr.list_split(HERE / "data_sample", "val")[:2]
    predict_batch, predictions = sr.predict_batch, []
    def recorded(*args, **kwargs):                                       # what evaluate predicted
        predictions.extend(predict_batch(*args, **kwargs))
        return predictions[-len(args[2]):]
    monkeypatch.setattr(sr, "predict_batch", recorded)
    metrics, texts = {}, {}
    for device in (CPU, STAND_IN):
        built = tiny_policy(seed=0)
        predictions.clear()
        with working_on(device):
            torch.manual_seed(0)
            pol = moved(built, device)
            metrics[device] = sr.evaluate(pol, BoxFiller(), refs, sr.Config(max_new_tokens=6))
        metrics[device].pop("seconds_per_sample")
        assert len(predictions) == 2
        assert all(prompts_on_the_cpu(g.inputs) for p in predictions for g, _ in p.stages)
        texts[device] = [g.texts for p in predictions for g, _ in p.stages]
    assert metrics[STAND_IN] == metrics[CPU] and texts[STAND_IN] == texts[CPU]


def test_the_bf16_reference_keeps_float32_rotary_frequencies(monkeypatch):
    """On a GPU the KL reference holds bf16 parameters, but its rotary inv_freq buffers (text and vision)
    stay float32: rounded to bf16 they would give every position another angle, and pi_ref another model."""
    to, moves = torch.nn.Module.to, []
    def no_gpu_here(module, *args, **kwargs):                 # the last step, the move to the GPU, is noted
        if args and isinstance(args[0], torch.device) and args[0].type == "cuda":
            moves.append(args[0])
            return module
        return to(module, *args, **kwargs)
    monkeypatch.setattr(torch.nn.Module, "to", no_gpu_here)
    reference = sr.load_reference(sr.Config(model="tiny"), "tiny", torch.device("cuda"))
    assert moves[-1].type == "cuda" and {p.dtype for p in reference.parameters()} == {torch.bfloat16}
    exact = {name: b for name, b in tiny_policy(seed=0).model.named_buffers() if "inv_freq" in name}
    assert any("visual" in name for name in exact) and any("language" in name for name in exact)
    kept = dict(reference.named_buffers())
    assert all(kept[name].dtype == torch.float32 and torch.equal(kept[name], b) for name, b in exact.items())
    # what casting the whole module does instead
    rounded = dict(tiny_policy(seed=0).model.to(torch.bfloat16).named_buffers())
    assert all(rounded[name].dtype == torch.bfloat16 for name in exact)
    assert not all(torch.equal(rounded[name].float(), b) for name, b in exact.items())


def test_a_saved_policy_loads_with_its_own_layers_not_hub_kernels(tmp_path):
    """transformers 5.25 with `kernels` installed (it requires it) swaps layers for kernels from the Hub when
    a model is loaded, and on a GPU fetches them at the first .train(): offline, a ValueError at the first
    training step. The policy and the reference load with the model's own layers."""
    sr.save_policy(tiny_policy(seed=0), tmp_path / "ckpt")
    policy = sr.load_policy(str(tmp_path / "ckpt"), CPU)
    reference = sr.load_reference(sr.Config(), str(tmp_path / "ckpt"), CPU)
    assert policy.model.use_kernels is False and reference.use_kernels is False
    policy.model.train()
    assert policy.model.kernels_mode is None                             # .train() kernelizes nothing


def test_a_checkpoint_written_on_a_gpu_resumes_on_a_cpu(sample, tmp_path, monkeypatch):
    """A GPU run's trainer_state.pt holds CUDA tensors (AdamW's moments, the RNG state): a plain torch.load
    fails on a machine without a GPU; the run resumes there all the same, moments and random draws intact."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)       # a machine without a GPU, even here
    pol = tiny_policy(seed=0)
    opt = sr.new_optimizer(pol, 1e-3)
    sr.sft_step(pol, opt, sr.sft_examples(pol, sr.GrowSegmenter(), sample, 3, np.random.default_rng(0)), 2)
    cfg = sr.Config(model="tiny", sam="grow", data=str(HERE / "data_sample"), out=str(tmp_path), steps=1)
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")   # saved as if from a GPU
        sr.save_checkpoint(tmp_path, pol, opt, {"phase": "grpo", "step": 0, "reference": "tiny"}, cfg)
    rng = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(tmp_path / "checkpoint" / "trainer_state.pt", weights_only=True)
    torch.manual_seed(123)
    run = sr.open_run(dataclasses.replace(cfg, resume=True), set())
    assert torch.equal(torch.get_rng_state(), rng) and run.policy.device == CPU
    saved, loaded = opt.state_dict()["state"], run.optimizer.state_dict()["state"]
    assert len(loaded) == len(saved) > 0
    assert all(torch.equal(loaded[k][m], saved[k][m]) for k in saved for m in ("exp_avg", "exp_avg_sq"))


def test_logprobs_under_autocast_are_a_float32_softmax_of_the_last_hidden_state(policy, sample, monkeypatch):
    """On a GPU the forward runs under bf16 autocast, but lm_head and the log-softmax run in float32: bf16
    logits would already be rounded (by up to 0.06 at |logit| 16-32) before any log-softmax."""
    if DEVICE.type == "meta":
        pytest.skip("no autocast on the stand-in device")
    monkeypatch.setattr(sr, "_autocast", lambda device: torch.autocast(device.type, dtype=torch.bfloat16))
    inputs, _ = sr.policy_inputs(policy, [sample.map, sample.sat], sr.STAGE1_PROMPT, sample.text)
    c = torch.tensor([60, 61, 62])
    hidden = []
    def keep(module, args, out):                   # the row's last hidden states (L, D), and autocast's state
        hidden.extend([out[0], torch.is_autocast_enabled(DEVICE.type)])
    hook = policy.model.model.language_model.norm.register_forward_hook(keep)
    try:
        logp, _ = sr.completion_logprobs(policy, policy.model, [(inputs, c)], 1.0)
    finally:
        hook.remove()
    P = inputs["input_ids"].shape[1]
    states = hidden[0][P - 1:P - 1 + len(c)].float()                       # (3, D): they predict c
    logits = torch.nn.functional.linear(states, policy.model.lm_head.weight.float())
    logits[..., policy.vision_ids] = float("-inf")
    expected = logits.log_softmax(-1).gather(-1, c.to(DEVICE)[:, None]).squeeze(-1)
    assert hidden[1] and logp.dtype == torch.float32                               # autocast did act
    assert torch.allclose(logp[0], expected, rtol=0, atol=1e-6)
