"""Chat template (docs/architecture.md §15.2), prompt ids for every mode (§13) and image preprocessing (§15.3).

Numpy + Pillow only; reproduces the official UMMProcessor bit for bit on the reference set.

Typed text is text: the prompt, question or instruction a user gives goes into the chat template as an untrusted
piece (`CheersTokenizer.encode_chat`). Special-token strings in it (`<image>`, `<image_gen>`, `<im_start>`,
`<|im_end|>`, ...) are encoded as the characters they are made of: they never become an image placeholder (-200/-300),
never start an image and never end or open a chat turn. The control tokens of a prompt come only from the template
and the image prefix this module writes. A prompt without such strings gets exactly the official ids.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import CheckpointError, InputError
from .tokenizer import IMAGE_GEN_PLACEHOLDER, IMAGE_PLACEHOLDER, CheersTokenizer, check_text

DEFAULT_SYSTEM = "You are a helpful assistant."
IMAGE_PROMPT_PREFIX = "<im_start><image><im_end>\n"  # user content before a question/instruction about an image
MAX_RESOLUTION = 2048        # largest working resolution taken from preprocessor_config.json (official: 512)
MAX_PATCH_SIZE = 256
MAX_CONFIG_BYTES = 1 << 20   # preprocessor_config.json is a few hundred bytes
_USER_MARK = "\ue000"        # stands for the user's text while the template is rendered (never in the template)


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
        problem = _resolution_problem(resolution, patch_size)
        if problem:
            raise InputError(problem)
        self.tokenizer = tokenizer
        self.special = tokenizer.special
        self.resolution = int(resolution)
        self.patch_size = int(patch_size)
        self.source = "preprocessor settings"          # where resolution/patch_size came from (for messages)
        self.file_resolution = None                    # scale_resolution of preprocessor_config.json, if any

    @classmethod
    def from_dir(cls, path, default_resolution: int = 512, resolution: int | None = None) -> "Processor":
        """Tokenizer + preprocessor_config.json (`scale_resolution`, `patch_size`); `resolution` overrides.

        The file is validated before anything is sized from it (CheckpointError naming the file and field): an
        object; `scale_resolution` and `patch_size` integers, the resolution a positive multiple of 2 x patch size,
        at most MAX_RESOLUTION. The pipeline then checks that the tokenizer and the resolution fit the model
        (`Pipeline.check_model`)."""
        path = Path(path)
        cfg_path = path / "preprocessor_config.json"
        cfg = _read_preprocessor_config(cfg_path) if cfg_path.is_file() else {}
        patch = _config_int(cfg, "patch_size", 16, cfg_path)
        file_res = _config_int(cfg, "scale_resolution", None, cfg_path)
        if file_res is not None or "patch_size" in cfg:
            problem = _resolution_problem(file_res if file_res is not None else default_resolution, patch,
                                          "scale_resolution" if file_res is not None else "resolution")
            if problem:
                raise CheckpointError(f"{cfg_path}: {problem}")
        res = resolution if resolution is not None else (file_res if file_res is not None else default_resolution)
        proc = cls(CheersTokenizer.from_dir(path), res, patch)
        proc.source, proc.file_resolution = str(cfg_path), file_res
        return proc

    @property
    def tokens_per_image(self) -> int:
        """LLM tokens per image: the und projector merges 2x2 ViT patches."""
        return (self.resolution // (2 * self.patch_size)) ** 2

    @property
    def latent_grid(self) -> int:
        return self.resolution // self.patch_size

    # ---- ids
    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of text the package writes (templates, training data), with `<image>` -> -200 and
        `<image_gen>` -> -300. Not for user text: the mode methods below keep what the user typed as text."""
        return self._placeholders(self.tokenizer.encode(text))

    def _placeholders(self, ids) -> list[int]:
        sub = {self.special.image: IMAGE_PLACEHOLDER, self.special.image_gen: IMAGE_GEN_PLACEHOLDER}
        return [sub.get(i, i) for i in ids]

    def user_turn_ids(self, content: str, prefix: str = "") -> list[int]:
        """One user turn of the chat template with the generation prompt. `prefix` (written by the package, e.g.
        IMAGE_PROMPT_PREFIX) may hold control tokens and image markers; `content` (typed by a user) is text: its
        special-token strings never become control tokens or placeholders (see the module docstring)."""
        check_text(content, "prompt")
        rendered = render_chat([{"role": "user", "content": prefix + _USER_MARK}], add_generation_prompt=True)
        head, tail = rendered.split(_USER_MARK)
        return self._placeholders(self.tokenizer.encode_chat([(head, True), (content, False), (tail, True)]))

    def understanding_ids(self, question: str) -> list[int]:
        """Image question; the question is appended verbatim after the image block (as the official example)."""
        return self.user_turn_ids(question, IMAGE_PROMPT_PREFIX)

    def chat_ids(self, prompt: str) -> list[int]:
        """Text-only chat (the runtime prepends the dummy image block)."""
        return self.user_turn_ids(prompt)

    def t2i_ids(self, prompt: str) -> list[int]:
        """Text-to-image: the trailing `<im_start>` triggers image generation."""
        return self.user_turn_ids(prompt) + [self.special.img_start]

    def edit_ids(self, instruction: str) -> list[int]:
        return self.user_turn_ids(instruction, IMAGE_PROMPT_PREFIX) + [self.special.img_start]

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


# ---------------------------------------------------------------------------------------------------- config file

def _resolution_problem(resolution, patch_size, name: str = "resolution") -> str:
    """Why (resolution, patch_size) cannot be a working resolution, or '' when it can."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)) \
            or not 1 <= patch_size <= MAX_PATCH_SIZE:
        return f"patch_size must be an integer in 1..{MAX_PATCH_SIZE}, got {patch_size!r}"
    step = 2 * int(patch_size)
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) \
            or not 0 < resolution <= MAX_RESOLUTION or resolution % step:
        return (f"{name} must be a positive multiple of {step} (2 x patch size {patch_size}) up to "
                f"{MAX_RESOLUTION}, got {resolution!r}")
    return ""


def _read_preprocessor_config(path: Path) -> dict:
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes, more than a preprocessor config holds "
                                  f"({MAX_CONFIG_BYTES})")
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"cannot read {path}: {' '.join(str(exc).split()) or type(exc).__name__}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _config_int(cfg: dict, key: str, default, path: Path):
    if key not in cfg:
        return default
    v = cfg[key]
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise CheckpointError(f"{path}: field '{key}' must be an integer, got {v!r:.40}")
    return v
