"""Images in and out of the service: data: URLs and uploads (PNG or JPEG, one per request, size-checked from the
header before any pixel is decoded), optional remote http(s) URLs, and PNG as base64 out."""

from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.error
import urllib.request
import warnings
from typing import Optional

import numpy as np

from ..errors import InputError
from ..processor import load_image
from .errors import APIError, bad_request

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg"}
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)


def decode_image_bytes(data: bytes, max_pixels: int, param: str = "image") -> np.ndarray:
    """PNG/JPEG bytes -> uint8 HxWx3 RGB (the processor's load_image: EXIF-upright, alpha dropped). The pixel count
    is read from the header first: an image over `max_pixels` is refused (413) before it is decoded."""
    from PIL import Image

    if not data:
        raise bad_request("the image is empty", param, code="invalid_image")
    too_big = APIError(413, f"the image has more than the {max_pixels} pixels this server accepts "
                            f"(--max-image-pixels)", code="image_too_large", param=param)
    try:
        with warnings.catch_warnings():          # the pixel count is checked below, against our own limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            w, h = img.size
    except Image.DecompressionBombError:
        raise too_big from None
    except Exception:  # noqa: BLE001 - PIL raises many types for data that is not an image
        raise bad_request("the data is not a PNG or JPEG image", param, code="invalid_image") from None
    if fmt not in FORMATS:
        raise bad_request(f"the image must be PNG or JPEG, got {fmt or 'an unknown format'}", param,
                          code="invalid_image")
    if w * h > max_pixels:
        img.close()
        raise APIError(413, f"the image has {w}x{h} = {w * h} pixels, more than the {max_pixels} this server "
                            f"accepts (--max-image-pixels)", code="image_too_large", param=param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
            return load_image(img)
    except InputError as exc:
        raise bad_request(f"unusable image: {exc}", param, code="invalid_image") from None
    except Exception:  # noqa: BLE001 - truncated or corrupt data
        raise bad_request("the image data is corrupt or truncated", param, code="invalid_image") from None
    finally:
        img.close()


def decode_data_url(url: str, max_pixels: int, param: str) -> np.ndarray:
    m = _DATA_URL.match(url)
    if not m:
        raise bad_request("an image URL must be a data: URL (data:image/png;base64,...)", param, code="invalid_url")
    mime = (m.group("mime") or "").lower()
    if mime not in ("image/png", "image/jpeg", "image/jpg"):
        raise bad_request(f"the data: URL must hold image/png or image/jpeg, got {mime or 'no media type'}", param,
                          code="invalid_image")
    if not m.group("b64"):
        raise bad_request("the data: URL must be base64-encoded (data:image/png;base64,...)", param,
                          code="invalid_image")
    payload = url[m.end():].strip()
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("the data: URL is not valid base64", param, code="invalid_base64") from None
    return decode_image_bytes(raw, max_pixels, param)


def fetch_remote(url: str, max_bytes: int, timeout: float, param: str) -> bytes:
    """GET an http(s) image (only with --allow-remote-images): at most `max_bytes`, `timeout` seconds."""
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "cheers-deploy-serve"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - scheme checked by the caller
            data = resp.read(max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise bad_request(f"cannot fetch the image URL: {str(reason).splitlines()[0][:200]}", param,
                          code="image_fetch_failed") from None
    if len(data) > max_bytes:
        raise APIError(413, f"the remote image is larger than {max_bytes} bytes", code="image_too_large",
                       param=param)
    return data


def load_url(url: str, max_pixels: int, max_bytes: int, allow_remote: bool, param: str,
             timeout: float = 10.0) -> np.ndarray:
    """An image_url of a chat message -> pixels."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_url(url, max_pixels, param)
    if scheme in ("http", "https"):
        if not allow_remote:
            raise bad_request("remote image URLs are refused by this server (start it with --allow-remote-images); "
                              "send the image inline as a data: URL (data:image/png;base64,...)", param,
                              code="remote_images_disabled")
        return decode_image_bytes(fetch_remote(url, max_bytes, timeout, param), max_pixels, param)
    raise bad_request("an image URL must be a data: URL (or http(s) with --allow-remote-images)", param,
                      code="invalid_url")


def png_b64(image: np.ndarray) -> str:
    """uint8 HxWx3 -> base64 of a PNG (lossless: the pixels come back exactly)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def parse_size(size: Optional[str], resolution: int) -> None:
    """OpenAI's `size` ("RxR"): only the model's own resolution (or "auto" / left out)."""
    if size is None or size == "auto":
        return
    want = f"{resolution}x{resolution}"
    if size.strip().lower() != want:
        raise bad_request(f"size {size!r} is not available: this model draws {want} images only", "size",
                          code="unsupported_size")
