"""Chat template (docs/architecture.md §15.2), prompt ids for every mode (§13) and image preprocessing (§15.3).

Numpy + Pillow only; reproduces the official UMMProcessor bit for bit on the reference set.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import CheckpointError, InputError
from .tokenizer import IMAGE_GEN_PLACEHOLDER, IMAGE_PLACEHOLDER, CheersTokenizer

DEFAULT_SYSTEM = "You are a helpful assistant."
IMAGE_PROMPT_PREFIX = "<im_start><image><im_end>\n"  # user content before a question/instruction about an image


def render_chat(messages, add_generation_prompt: bool = True, trim: bool = False) -> str:
    """The official chat template; `trim=True` is the training variant that strips every content (§14.1, §17.32)."""
    if not messages:
        raise InputError("chat needs at least one message")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InputError(f"a chat message must be {{'role': str, 'content': str}}, got {m!r}")
    parts = []
    if messages[0]["role"] != "system":
        parts.append(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n")
    for m in messages:
        content = m["content"].strip() if trim else m["content"]
        parts.append(f"<|im_start|>{m['role']}\n{content}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------------- images

def _from_pil(img: Image.Image) -> np.ndarray:
    img = ImageOps.exif_transpose(img)  # camera photos store rotation in EXIF; the pixels must be upright
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # plain convert("RGB") would clip 16-bit values at 255; scale the 16-bit range down instead
        return _from_array(np.asarray(img).astype(np.uint16, copy=False) if img.mode != "I"
                           else np.clip(np.asarray(img), 0, 65535).astype(np.uint16))
    with warnings.catch_warnings():  # "palette images with transparency" warning: alpha is dropped anyway
        warnings.simplefilter("ignore")
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def _from_array(a: np.ndarray) -> np.ndarray:
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))) or a.shape[0] == 0 or a.shape[1] == 0:
        raise InputError(f"image array must be HxW, HxWx3 or HxWx4, got shape {a.shape}")
    if a.dtype == np.uint16:
        a = np.round(a.astype(np.float64) / 257.0).astype(np.uint8)  # 65535 -> 255 exactly
    elif a.dtype != np.uint8:
        raise InputError(f"image array must be uint8 (or uint16), got {a.dtype}; "
                         "convert floats in [0,1] with (x * 255).round().astype(np.uint8)")
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)  # same as PIL's L -> RGB
    return np.ascontiguousarray(a[..., :3])    # RGBA -> RGB drops alpha, like PIL's plain convert


def load_image(image) -> np.ndarray:
    """A path, a PIL image or a uint8/uint16 array -> uint8 HxWx3 RGB (EXIF-upright, alpha dropped)."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"image file not found: {path}")
        try:
            with Image.open(path) as img:
                img.load()
                return _from_pil(img)
        except Exception as exc:  # PIL plugins raise OSError, SyntaxError, struct.error... on corrupt files
            raise InputError(f"cannot read image {path}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
    if isinstance(image, Image.Image):
        return _from_pil(image)
    if isinstance(image, np.ndarray):
        return _from_array(image)
    raise InputError(f"unsupported image type {type(image).__name__} (expected a path, a PIL image or an array)")


def _check_uint8_rgb(img: np.ndarray) -> None:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise InputError("expected a uint8 HxWx3 RGB array (use load_image first)")


def _to_chw_float(img: np.ndarray) -> np.ndarray:
    # x * (1/255) in float64, then float32: exactly what the official rescale does
    return (img.astype(np.float64) * (1 / 255)).astype(np.float32).transpose(2, 0, 1).copy()


def preprocess_understanding(img_uint8: np.ndarray, resolution: int) -> np.ndarray:
    """Letterbox to RxR (§15.3): aspect-preserving bicubic resize, black padding centred; float32 [3,R,R] in [0,1]."""
    _check_uint8_rgb(img_uint8)
    h, w = img_uint8.shape[:2]
    scale = min(resolution / h, resolution / w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))  # Python round (half to even), as the official
    resized = np.asarray(Image.fromarray(img_uint8).resize((nw, nh), Image.BICUBIC))
    out = np.zeros((resolution, resolution, 3), dtype=np.uint8)
    top, left = (resolution - nh) // 2, (resolution - nw) // 2
    out[top:top + nh, left:left + nw] = resized
    return _to_chw_float(out)


def preprocess_generation_target(img_uint8: np.ndarray, resolution: int) -> np.ndarray:
    """Training targets (§15.3): bicubic resize of the short side to R, centre crop RxR; float32 [3,R,R]."""
    _check_uint8_rgb(img_uint8)
    h, w = img_uint8.shape[:2]
    scale = resolution / min(h, w)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    resized = np.asarray(Image.fromarray(img_uint8).resize((nw, nh), Image.BICUBIC))
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    return _to_chw_float(resized[top:top + resolution, left:left + resolution])


def make_dummy_image(seed: int | None = None) -> np.ndarray:
    """The official random 256x256 dummy image; seed s equals np.random.seed(s) + randint, without the global RNG."""
    return np.random.RandomState(seed).randint(0, 256, (256, 256, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------- processor

class Processor:
    """Prompt ids for each mode and pixel preprocessing at the checkpoint's working resolution."""

    def __init__(self, tokenizer: CheersTokenizer, resolution: int, patch_size: int = 16):
        if patch_size <= 0 or resolution <= 0 or resolution % (2 * patch_size):
            raise InputError(f"resolution {resolution} must be a positive multiple of {2 * patch_size} "
                             f"(2 x patch size {patch_size})")
        self.tokenizer = tokenizer
        self.special = tokenizer.special
        self.resolution = int(resolution)
        self.patch_size = int(patch_size)

    @classmethod
    def from_dir(cls, path, default_resolution: int = 512, resolution: int | None = None) -> "Processor":
        """Tokenizer + preprocessor_config.json (`scale_resolution`, `patch_size`); `resolution` overrides."""
        path = Path(path)
        cfg = {}
        if (path / "preprocessor_config.json").is_file():
            try:
                cfg = json.loads((path / "preprocessor_config.json").read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"cannot read {path / 'preprocessor_config.json'}: {exc}") from exc
        res = resolution if resolution is not None else int(cfg.get("scale_resolution", default_resolution))
        return cls(CheersTokenizer.from_dir(path), res, int(cfg.get("patch_size", 16)))

    @property
    def tokens_per_image(self) -> int:
        """LLM tokens per image: the und projector merges 2x2 ViT patches."""
        return (self.resolution // (2 * self.patch_size)) ** 2

    @property
    def latent_grid(self) -> int:
        return self.resolution // self.patch_size

    # ---- ids
    def encode_prompt(self, text: str) -> list[int]:
        """Token ids with `<image>` -> -200 and `<image_gen>` -> -300."""
        sub = {self.special.image: IMAGE_PLACEHOLDER, self.special.image_gen: IMAGE_GEN_PLACEHOLDER}
        return [sub.get(i, i) for i in self.tokenizer.encode(text)]

    def _user_turn(self, content: str) -> list[int]:
        if not isinstance(content, str):
            raise InputError(f"prompt must be a string, got {type(content).__name__}")
        return self.encode_prompt(render_chat([{"role": "user", "content": content}], add_generation_prompt=True))

    def understanding_ids(self, question: str) -> list[int]:
        """Image question; the question is appended verbatim after the image block (as the official example)."""
        return self._user_turn(IMAGE_PROMPT_PREFIX + question)

    def chat_ids(self, prompt: str) -> list[int]:
        """Text-only chat (the runtime prepends the dummy image block)."""
        return self._user_turn(prompt)

    def t2i_ids(self, prompt: str) -> list[int]:
        """Text-to-image: the trailing `<im_start>` triggers image generation."""
        return self._user_turn(prompt) + [self.special.img_start]

    def edit_ids(self, instruction: str) -> list[int]:
        return self._user_turn(IMAGE_PROMPT_PREFIX + instruction) + [self.special.img_start]

    def uncond_ids(self, ids) -> list[int]:
        """CFG branch: every id except `<im_start>`, `<im_end>` and image placeholders becomes `<no_mean>` (§17.11)."""
        keep = {self.special.img_start, self.special.img_end, IMAGE_PLACEHOLDER}
        return [int(i) if int(i) in keep else self.special.no_mean for i in ids]

    # ---- pixels
    def pixel_values(self, image) -> np.ndarray:
        """Any supported image input -> float32 [3,R,R] by the understanding (letterbox) rule."""
        return preprocess_understanding(load_image(image), self.resolution)

    def dummy_pixel_values(self, seed: int | None = None) -> np.ndarray:
        """Pixels of the random dummy image that text-only and T2I prompts carry (§13.1)."""
        return preprocess_understanding(make_dummy_image(seed), self.resolution)
