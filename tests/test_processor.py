"""Processor: chat template, prompt ids of every mode and image preprocessing against the official reference set."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cheers_deploy.errors import InputError
from cheers_deploy.processor import (Processor, load_image, make_dummy_image, preprocess_generation_target,
                                     preprocess_understanding, render_chat)
from cheers_deploy.tokenizer import CHAT_TEMPLATE, IMAGE_PLACEHOLDER


@pytest.fixture(scope="session")
def ref_dir() -> Path:
    d = Path(__file__).resolve().parent / "data" / "official-tiny"
    if not (d / "reference.npz").is_file():
        pytest.skip(f"official reference set not found at {d}")
    return d


@pytest.fixture(scope="session")
def ref_npz(ref_dir):
    return np.load(ref_dir / "reference.npz")


@pytest.fixture(scope="session")
def ref_json(ref_dir):
    return json.loads((ref_dir / "reference.json").read_text())


@pytest.fixture(scope="session")
def proc(ref_dir) -> Processor:
    return Processor.from_dir(ref_dir)


# ---------------------------------------------------------------------------------------------------- chat / ids

def test_render_chat_matches_jinja_template():
    jinja2 = pytest.importorskip("jinja2")
    template = jinja2.Environment().from_string(CHAT_TEMPLATE)
    cases = [
        [{"role": "user", "content": "hi"}],
        [{"role": "user", "content": "\n  spaced prompt \n"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    ]
    for messages in cases:
        for gen in (True, False):
            assert render_chat(messages, add_generation_prompt=gen) == \
                template.render(messages=messages, add_generation_prompt=gen)


def test_render_chat_trim_and_errors():
    msgs = [{"role": "user", "content": "\n  cap \n"}, {"role": "assistant", "content": " <im_start><image_gen><im_end> "}]
    assert render_chat(msgs, add_generation_prompt=False, trim=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\ncap<|im_end|>\n"
        "<|im_start|>assistant\n<im_start><image_gen><im_end><|im_end|>\n")
    assert "\n  cap \n" in render_chat(msgs)  # the inference template keeps contents verbatim (§17.32)
    for bad in ([], [{"role": "user"}], [{"role": "user", "content": 3}], ["hi"]):
        with pytest.raises(InputError):
            render_chat(bad)


def test_reference_prompt_ids(proc, ref_json, ref_npz):
    assert ref_json["i2t_question"] == " Which shapes and colours do you see?"  # leading space kept verbatim
    assert proc.understanding_ids(ref_json["i2t_question"]) == ref_npz["i2t/input_ids"][0].tolist()
    assert proc.chat_ids(ref_json["prompts"]["t2t"]) == ref_npz["t2t/input_ids"][0].tolist()
    t2i = proc.t2i_ids(ref_json["prompts"]["t2i"])
    assert t2i == ref_npz["t2i/input_ids"][0].tolist()
    assert proc.uncond_ids(t2i) == ref_npz["t2i/uncond_input_ids"][0].tolist()


def test_edit_and_uncond_ids(proc):
    s = proc.special
    ids = proc.edit_ids("make it red")
    assert ids[-1] == s.img_start and ids.count(IMAGE_PLACEHOLDER) == 1
    assert ids[:-1] == proc.understanding_ids("make it red")
    un = proc.uncond_ids(ids)
    assert len(un) == len(ids)
    # image-conditioned guidance keeps the image block and the trigger, everything else is <no_mean>
    assert [i for i in un if i != s.no_mean] == [s.img_start, IMAGE_PLACEHOLDER, s.img_end, s.img_start]
    assert proc.encode_prompt("<image_gen>") == [-300]


def test_geometry(proc, ref_dir):
    assert (proc.resolution, proc.patch_size, proc.tokens_per_image, proc.latent_grid) == (128, 16, 16, 8)
    p512 = Processor(proc.tokenizer, 512)
    assert (p512.tokens_per_image, p512.latent_grid) == (256, 32)
    assert Processor.from_dir(ref_dir, resolution=256).resolution == 256
    with pytest.raises(InputError):
        Processor(proc.tokenizer, 100)


# ---------------------------------------------------------------------------------------------------- pixels

@pytest.mark.parametrize("src,dst", [("processor/nonsquare_image_uint8", "processor/nonsquare_pixel_values"),
                                     ("inputs/dummy_image_uint8", "t2t/pixel_values"),
                                     ("inputs/test_image_uint8", "i2t/pixel_values")])
def test_understanding_preprocessing_matches_reference(ref_npz, src, dst):
    out = preprocess_understanding(ref_npz[src], 128)
    assert out.dtype == np.float32 and out.shape == (3, 128, 128)
    np.testing.assert_array_equal(out, ref_npz[dst][0])


def test_dummy_image(ref_npz, proc):
    np.random.seed(0)
    state = np.random.get_state()[1].copy()
    np.testing.assert_array_equal(make_dummy_image(4242), ref_npz["inputs/dummy_image_uint8"])
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # the global RNG is untouched
    np.testing.assert_array_equal(proc.dummy_pixel_values(4242), ref_npz["t2t/pixel_values"][0])
    assert not np.array_equal(make_dummy_image(None), make_dummy_image(None))


def test_letterbox_geometry():
    img = np.full((64, 32, 3), 200, np.uint8)  # tall: scaled x2 to 64 wide, padded 32 left / 32 right
    out = preprocess_understanding(img, 128)
    assert np.all(out[:, :, :32] == 0) and np.all(out[:, :, 96:] == 0)
    np.testing.assert_allclose(out[:, :, 32:96], np.float32(200 / 255), rtol=0, atol=1e-6)
    odd = preprocess_understanding(np.full((3, 128, 3), 255, np.uint8), 128)  # pad 125 rows: 62 top, 63 bottom
    assert np.all(odd[:, 62:65] == 1.0) and np.all(odd[:, :62] == 0) and np.all(odd[:, 65:] == 0)


def test_generation_target_crop():
    rng = np.random.RandomState(0)
    img = rng.randint(0, 256, (256, 128, 3), dtype=np.uint8)
    out = preprocess_generation_target(img, 128)  # short side already 128: pure centre crop of rows 64..191
    np.testing.assert_array_equal(out, (img[64:192].astype(np.float64) / 255).astype(np.float32).transpose(2, 0, 1))
    big = preprocess_generation_target(rng.randint(0, 256, (300, 451, 3), dtype=np.uint8), 128)
    assert big.shape == (3, 128, 128) and big.dtype == np.float32 and 0 <= big.min() and big.max() <= 1


# ---------------------------------------------------------------------------------------------------- load_image

@pytest.fixture()
def rgb():
    return np.random.RandomState(1).randint(0, 256, (20, 30, 3), dtype=np.uint8)


def test_load_rgb_path_pil_array(rgb, tmp_path):
    Image.fromarray(rgb).save(tmp_path / "a.png")
    for src in (tmp_path / "a.png", str(tmp_path / "a.png"), Image.fromarray(rgb), rgb):
        out = load_image(src)
        assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
        np.testing.assert_array_equal(out, rgb)


def test_load_rgba_la_palette_gray(rgb, tmp_path):
    alpha = np.random.RandomState(2).randint(0, 256, (20, 30, 1), dtype=np.uint8)
    rgba = np.concatenate([rgb, alpha], axis=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.png"), rgb)  # alpha dropped, colours untouched
    np.testing.assert_array_equal(load_image(rgba), rgb)
    gray = rgb[..., 0]
    expected = np.stack([gray] * 3, axis=2)
    np.testing.assert_array_equal(load_image(gray), expected)
    np.testing.assert_array_equal(load_image(gray[..., None]), expected)
    np.testing.assert_array_equal(load_image(Image.fromarray(gray, "L")), expected)
    Image.fromarray(np.concatenate([gray[..., None], alpha], axis=2), "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(load_image(tmp_path / "la.png"), expected)
    pal = Image.fromarray(gray, "L").convert("P")
    pal.info["transparency"] = 0
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_image(tmp_path / "p.png"), expected)


def test_load_16_bit(tmp_path):
    a16 = np.random.RandomState(3).randint(0, 65536, (20, 30), dtype=np.uint16)
    a16[0, :3] = [0, 65535, 257 * 100]
    expected = np.stack([np.round(a16 / 257).astype(np.uint8)] * 3, axis=2)
    assert list(expected[0, :3, 0]) == [0, 255, 100]
    Image.fromarray(a16).save(tmp_path / "g16.png")  # a 16-bit grayscale PNG
    np.testing.assert_array_equal(load_image(tmp_path / "g16.png"), expected)
    np.testing.assert_array_equal(load_image(Image.fromarray(a16)), expected)
    np.testing.assert_array_equal(load_image(a16), expected)
    np.testing.assert_array_equal(load_image(np.stack([a16] * 3, axis=2)), expected)


@pytest.mark.parametrize("orientation,k", [(3, 2), (6, -1), (8, 1)])  # EXIF value -> np.rot90 turns (ccw)
def test_load_exif_orientation(rgb, tmp_path, orientation, k):
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(tmp_path / "r.png", exif=exif.tobytes())
    out = load_image(tmp_path / "r.png")
    np.testing.assert_array_equal(out, np.rot90(rgb, k=k))
    with Image.open(tmp_path / "r.png") as opened:
        np.testing.assert_array_equal(load_image(opened), np.rot90(rgb, k=k))


def test_load_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="cannot read image"):
        load_image(tmp_path / "junk.png")
    for bad in (np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 2), np.uint8), np.zeros((0, 4, 3), np.uint8),
                np.zeros((2, 4, 4, 3), np.uint8), 42):
        with pytest.raises(InputError) as err:
            load_image(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(InputError):
        preprocess_understanding(np.zeros((4, 4), np.uint8), 128)  # not RGB: must go through load_image
