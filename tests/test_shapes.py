"""The synthetic shapes world: determinism, splits, text consistency, rendering."""

import os
import re
import sys

import cv2
import numpy as np
import pytest

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from cheers_deploy.data import shapes as W  # noqa: E402


@pytest.fixture(scope="module")
def splits():
    return {name: W.make_split(name, 1500, seed=0) for name in W.SPLITS}


def test_constants():
    assert len(W.SHAPES) >= 4 and len(W.COLORS) >= 6
    assert set(W.POSITIONS) == {"left", "right", "top", "bottom", "center"}
    assert set(W.SIZES) == {"small", "large"}
    assert W.DEFAULT_RESOLUTION == 64
    for c, s in W.HELDOUT_COMBOS:
        assert c in W.COLORS and s in W.SHAPES
    # every colour and every shape still occurs in training combinations
    train_combos = {(c, s) for c in W.COLORS for s in W.SHAPES} - set(W.HELDOUT_COMBOS)
    assert {c for c, _ in train_combos} == set(W.COLORS)
    assert {s for _, s in train_combos} == set(W.SHAPES)
    # palette colours are far apart and far from every background
    pal = np.array(list(W.COLORS.values()), float)
    d = np.linalg.norm(pal[:, None] - pal[None], axis=2) + np.eye(len(pal)) * 1e9
    assert d.min() > 60
    for bg in W.BACKGROUNDS.values():
        assert np.linalg.norm(pal - np.array(bg, float), axis=1).min() > 120


def _fingerprint(samples, with_images=True):
    out = []
    for s in samples:
        item = (s.key, s.scene, s.caption, tuple(s.prompts), tuple(s.qa))
        if with_images:
            item += (s.image.tobytes(),)
        out.append(item)
    return out


def test_determinism():
    for split in W.SPLITS:
        a = W.make_split(split, 40, seed=7)
        b = W.make_split(split, 40, seed=7)
        assert _fingerprint(a) == _fingerprint(b)
        c = W.make_split(split, 40, seed=8)
        fa, fc = _fingerprint(a), _fingerprint(c)
        assert sum(x != y for x, y in zip(fa, fc)) >= 30
        assert [s.caption for s in a] != [s.caption for s in c]
        # prefix-stable: sample i depends only on (split, seed, i)
        assert _fingerprint(W.make_split(split, 15, seed=7)) == fa[:15]
    # rendering is a pure function of the scene
    s = W.make_split("train", 1, seed=3)[0]
    assert np.array_equal(W.render(s.scene), W.render(s.scene))


def test_split_membership_and_disjointness(splits):
    heldout = set(W.HELDOUT_COMBOS)
    keys = {name: {s.key for s in ss} for name, ss in splits.items()}
    assert not keys["train"] & keys["heldout"]
    assert not keys["train"] & keys["compositional"]
    assert not keys["heldout"] & keys["compositional"]
    for name, ss in splits.items():
        for s in ss:
            assert s.split == name and W.scene_split(s.scene) == name
            combos = {o.combo for o in s.scene.objects}
            if name == "compositional":
                assert combos & heldout
            else:
                assert not combos & heldout, (name, s.caption)
    # held-out combos never appear in train, neither alone nor in two-object scenes
    train_combos = {o.combo for s in splits["train"] for o in s.scene.objects}
    assert not train_combos & heldout
    assert len(train_combos) == 30 - len(heldout)
    comp_combos = {o.combo for s in splits["compositional"] for o in s.scene.objects}
    assert heldout <= comp_combos
    # single- and two-object scenes, about 70 / 30
    for ss in splits.values():
        n2 = np.mean([len(s.scene.objects) == 2 for s in ss])
        assert 0.25 < n2 < 0.35
        assert {len(s.scene.objects) for s in ss} == {1, 2}


def test_scene_constraints(splits):
    for ss in splits.values():
        for s in ss:
            objs = s.scene.objects
            assert len({o.position for o in objs}) == len(objs)
            assert len({o.combo for o in objs}) == len(objs)
            for o in objs:
                assert abs(o.dx) <= W.JITTER and abs(o.dy) <= W.JITTER
    o = W.ShapeObject("circle", "red", "left", "small")
    with pytest.raises(ValueError):
        W.Scene((o, W.ShapeObject("star", "blue", "left", "large")))
    with pytest.raises(ValueError):
        W.Scene((o, W.ShapeObject("circle", "red", "right", "large")))
    with pytest.raises(ValueError):
        W.ShapeObject("hexagon", "red", "left", "small")
    with pytest.raises(ValueError):
        W.make_split("validation", 3, seed=0)


def _object_mask(obj, res):
    scene = W.Scene((obj,), background="gray")
    img = W.render(scene, res).astype(int)
    return np.abs(img - np.array(W.BACKGROUNDS["gray"])).sum(axis=2) > 0


@pytest.mark.parametrize("res", [64, 128])
def test_worst_case_geometry_keeps_objects_apart(res):
    """Two large objects at adjacent anchors jittered towards each other still leave a gap, and no
    object touches the 2-px border ring (the detector estimates the background there)."""
    J = W.JITTER
    toward = {"left": (J, 0), "right": (-J, 0), "top": (0, J), "bottom": (0, -J)}
    for shape_a in W.SHAPES:
        for shape_b in W.SHAPES:
            for pos, (dx, dy) in toward.items():
                a = W.ShapeObject(shape_a, "red", pos, "large", dx, dy)
                b = W.ShapeObject(shape_b, "blue", "center", "large", -dx, -dy)
                ma, mb = _object_mask(a, res), _object_mask(b, res)
                grown = cv2.dilate(ma.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
                assert not (grown & mb).any(), (shape_a, shape_b, pos, res)
    for shape in W.SHAPES:
        for pos in ("left", "right", "top", "bottom"):
            dx, dy = toward[pos]
            m = _object_mask(W.ShapeObject(shape, "red", pos, "large", -dx, -dy), res)
            assert not m[:2].any() and not m[-2:].any() and not m[:, :2].any() and not m[:, -2:].any()


def _check_qa(scene, qtype, q, a):
    objs = scene.objects
    phrase_to_pos = {v: k for k, v in W.POSITION_PHRASES.items()}
    if qtype == "color":
        m = re.fullmatch(r"what color is the (\w+)( (?:on|at|in) the \w+)?\?", q)
        assert m, q
        cands = [o for o in objs if o.shape == m[1]]
        if m[2]:
            cands = [o for o in cands if o.position == phrase_to_pos[m[2].strip()]]
        assert len(cands) == 1, q
        return cands[0].color == a
    if qtype == "shape":
        m = re.fullmatch(r"what shape is ((?:on|at|in) the \w+)\?", q)
        cands = [o for o in objs if o.position == phrase_to_pos[m[1]]]
        assert len(cands) == 1
        return cands[0].shape == a
    if qtype == "position":
        m = re.fullmatch(r"where is the (\w+) (\w+)\?", q)
        cands = [o for o in objs if (o.color, o.shape) == (m[1], m[2])]
        assert len(cands) == 1
        return cands[0].position == a
    if qtype == "count":
        assert q == "how many shapes are there?"
        return a == {1: "one", 2: "two"}[len(objs)]
    if qtype == "exists":
        m = re.fullmatch(r"is there (a|an) (\w+) (\w+)\?", q)
        assert m[1] == ("an" if m[2][0] in "aeiou" else "a")
        present = any((o.color, o.shape) == (m[2], m[3]) for o in objs)
        return a == ("yes" if present else "no")
    raise AssertionError(f"unknown question type {qtype}")


def test_qa_answers_consistent_with_scene(splits):
    vocab = set(W.vocabulary())
    answers = set(W.answer_vocabulary())
    seen_types = set()
    for ss in splits.values():
        for s in ss:
            n_yes = n_no = 0
            for qtype, q, a in s.qa:
                seen_types.add(qtype)
                assert re.fullmatch(r"[a-z]+", a), a  # single lowercase word
                assert a in answers
                assert _check_qa(s.scene, qtype, q, a), (s.caption, q, a)
                n_yes += a == "yes"
                n_no += a == "no"
                assert set(W.words(q)) <= vocab
            assert n_yes == n_no == len(s.scene.objects)
            # one question of each kind per object (colour, shape, position), one count question
            kinds = [t for t, _, _ in s.qa]
            assert kinds.count("color") == kinds.count("shape") == kinds.count("position") == len(s.scene.objects)
            assert kinds.count("count") == 1
            # questions of a sample are unique
            assert len({q for _, q, _ in s.qa}) == len(s.qa)
    assert seen_types == set(W.QUESTION_TYPES)


def test_captions_prompts_and_vocabulary(splits):
    vocab = set(W.vocabulary())
    assert {"?", "circle", "red", "left", "small", "yes", "two", "an"} <= vocab
    for ss in splits.values():
        for s in ss:
            assert s.caption == W.caption(s.scene) == s.prompts[0]
            assert set(W.words(s.caption)) <= vocab
            for p in s.prompts:
                assert set(W.words(p)) <= vocab
                specs = W.parse_prompt(p)
                assert sorted(specs, key=lambda o: W.POSITIONS.index(o.position)) == [
                    W.ObjectSpec(o.shape, o.color, o.position, o.size if o.size in p.split() else None)
                    for o in s.scene.ordered_objects()
                ]
    s1 = W.Scene((W.ShapeObject("circle", "red", "left", "small"),))
    assert W.caption(s1) == "a small red circle on the left"
    assert "a red circle on the left" in W.t2i_prompts(s1)
    s2 = W.Scene((W.ShapeObject("star", "green", "right", "large"), W.ShapeObject("circle", "red", "left", "small")))
    assert "a red circle on the left and a green star on the right" in W.t2i_prompts(s2)
    assert W.caption(W.Scene((W.ShapeObject("square", "orange", "top", "large"),))) == \
        "a large orange square at the top"
    assert W.t2i_prompts(W.Scene((W.ShapeObject("square", "orange", "top", "large"),)))[1] == \
        "an orange square at the top"


@pytest.mark.parametrize("res", [64, 128])
def test_render_resolutions(res):
    for s in W.make_split("compositional", 20, seed=1, resolution=res):
        img = s.image
        assert img.shape == (res, res, 3) and img.dtype == np.uint8
        assert img is s.image  # cached
        # light background, saturated objects
        border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3)])
        assert border.mean() > 200
        assert (np.abs(img.astype(int) - np.median(border, axis=0)).sum(axis=2) > 150).any()


def test_resolutions_agree():
    """Layout is resolution-independent: the 128 px render area-downsampled matches the 64 px one."""
    for s in W.make_split("train", 10, seed=2):
        lo = W.render(s.scene, 64).astype(float)
        hi = cv2.resize(W.render(s.scene, 128), (64, 64), interpolation=cv2.INTER_AREA).astype(float)
        assert np.abs(lo - hi).mean() < 3.0
