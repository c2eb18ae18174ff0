"""The OpenCV shapes detector and the GenEval-style generation score."""

import os
import sys

import cv2
import numpy as np
import pytest

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from cheers_deploy.data import shapes as W  # noqa: E402
from cheers_deploy.eval import Detection, detect, score_generation  # noqa: E402

N_CLEAN = 400
KEYS = ("color", "shape", "position", "size", "count")


def _blur_noise(img, i, sigma_blur, sigma_noise):
    rng = np.random.default_rng(1000 + i)
    x = img.astype(np.float32)
    res = img.shape[0]
    if sigma_blur:
        x = cv2.GaussianBlur(x, (0, 0), sigma_blur * res / 64.0)
    if sigma_noise:
        x = x + rng.normal(0.0, sigma_noise, x.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _accuracy(samples, perturb=None):
    hits = {k: [] for k in KEYS}
    for i, s in enumerate(samples):
        img = s.image if perturb is None else perturb(s.image, i)
        r = score_generation(img, s.scene)
        for k in KEYS:
            hits[k].append(bool(r[k]))
    return {k: float(np.mean(v)) for k, v in hits.items()}


@pytest.fixture(scope="module")
def heldout():
    return W.make_split("heldout", N_CLEAN, seed=123)


def test_clean_accuracy(heldout):
    acc = _accuracy(heldout)
    print(f"\ndetector on {len(heldout)} clean heldout renders (64 px): "
          + ", ".join(f"{k}={v:.4f}" for k, v in acc.items()))
    for k in ("color", "shape", "position", "count"):
        assert acc[k] >= 0.99, (k, acc)
    assert acc["size"] >= 0.99, acc


@pytest.mark.parametrize("sigma_blur,sigma_noise", [(0.8, 0.0), (0.0, 8.0), (0.8, 8.0)])
def test_perturbed_accuracy(heldout, sigma_blur, sigma_noise):
    samples = heldout[:300]
    acc = _accuracy(samples, lambda img, i: _blur_noise(img, i, sigma_blur, sigma_noise))
    print(f"\ndetector on {len(samples)} heldout renders, blur sigma={sigma_blur}px noise sigma={sigma_noise}: "
          + ", ".join(f"{k}={v:.4f}" for k, v in acc.items()))
    for k in ("color", "shape", "position", "count"):
        assert acc[k] >= 0.95, (k, acc)


def test_accuracy_at_128_and_other_splits():
    for split, res in (("compositional", 64), ("train", 64), ("heldout", 128)):
        samples = W.make_split(split, 100, seed=5, resolution=res)
        acc = _accuracy(samples)
        print(f"\ndetector on 100 clean {split} renders ({res} px): "
              + ", ".join(f"{k}={v:.4f}" for k, v in acc.items()))
        for k in KEYS:
            assert acc[k] >= 0.99, (split, res, k, acc)


def test_detections_fields_and_determinism():
    scene = W.Scene((W.ShapeObject("star", "orange", "top", "large", 0.01, -0.005),
                     W.ShapeObject("square", "purple", "right", "small")), background="beige", texture=True,
                    texture_seed=4)
    img = W.render(scene)
    dets = detect(img)
    assert dets == detect(img.copy())
    assert len(dets) == 2 and all(isinstance(d, Detection) for d in dets)
    big, small = dets  # sorted by area
    assert (big.shape, big.color, big.position, big.size) == ("star", "orange", "top", "large")
    assert (small.shape, small.color, small.position, small.size) == ("square", "purple", "right", "small")
    x, y, w, h = big.bbox
    assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64
    expected = W.shape_unit_area("star") * (W.SIZE_RADIUS["large"] * 64) ** 2
    assert abs(big.area - expected) / expected < 0.1
    assert abs(big.centroid[0] - 0.51) < 0.03 and abs(big.centroid[1] - 0.175) < 0.03
    assert set(big.shape_scores) == set(W.SHAPES)
    assert big.features["solidity"] < 0.85
    # float input in [0, 1] gives the same answer
    assert [d.shape for d in detect(img.astype(np.float32) / 255.0)] == [d.shape for d in dets]


def test_empty_images():
    for bg in W.BACKGROUNDS:
        plain = np.zeros((64, 64, 3), np.uint8)
        plain[:] = W.BACKGROUNDS[bg]
        assert detect(plain) == []
        noisy = np.clip(plain + np.random.default_rng(0).normal(0, 10, plain.shape), 0, 255).astype(np.uint8)
        assert detect(noisy) == []
    with pytest.raises(ValueError):
        detect(np.zeros((64, 64), np.uint8))


def test_score_generation_single_object():
    scene = W.Scene((W.ShapeObject("triangle", "green", "bottom", "small"),))
    img = W.render(scene)
    r = score_generation(img, scene)
    assert r["color"] and r["shape"] and r["position"] and r["size"] and r["count"]
    assert r["single_object"] and r["two_object"] is None and r["overall"]
    # prompt strings, with and without size
    assert score_generation(img, "a small green triangle at the bottom")["overall"]
    r = score_generation(img, "a green triangle at the bottom")
    assert r["overall"] and r["size"] is None
    # wrong attributes are caught one by one
    r = score_generation(img, "a green triangle at the top")
    assert r["color"] and r["shape"] and not r["position"] and not r["overall"]
    r = score_generation(img, "a red triangle at the bottom")
    assert not r["color"] and r["shape"] and r["position"] and not r["single_object"]
    r = score_generation(img, "a green square at the bottom")
    assert r["color"] and not r["shape"]
    assert not score_generation(img, "a large green triangle at the bottom")["size"]
    # nothing generated
    blank = np.full_like(img, 232)
    r = score_generation(blank, scene)
    assert not any(r[k] for k in ("color", "shape", "position", "count", "overall"))


def test_score_generation_two_objects_and_counting():
    a = W.ShapeObject("circle", "red", "left", "large")
    b = W.ShapeObject("star", "blue", "right", "small")
    c = W.ShapeObject("cross", "yellow", "center", "small")
    img = W.render(W.Scene((a, b)))
    r = score_generation(img, "a red circle on the left and a blue star on the right")
    assert r["two_object"] and r["count"] and r["position"] and r["overall"] and r["n_detections"] == 2
    # order of the prompt does not matter
    assert score_generation(img, "a blue star on the right and a red circle on the left")["overall"]
    # swapped positions: objects right, positions wrong
    r = score_generation(img, "a red circle on the right and a blue star on the left")
    assert r["two_object"] and not r["position"]
    # a missing object
    r = score_generation(W.render(W.Scene((a,))), W.Scene((a, b)))
    assert not r["two_object"] and not r["count"] and not r["overall"]
    # an extra object: objects found, count wrong
    r = score_generation(W.render(W.Scene((a, b))), W.Scene((a,)))
    assert r["single_object"] and not r["count"] and not r["overall"]
    r = score_generation(W.render(W.Scene((a, c))), [W.ObjectSpec("circle", "red", "left"),
                                                     W.ObjectSpec("cross", "yellow", "center")])
    assert r["overall"]
