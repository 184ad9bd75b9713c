"""Images a request brings, checked before any of them is decoded.

An `image_url` is a `data:` URL or, only where the server was given `--media-path DIR`, a
local file inside DIR (a path or a `file://` URL; resolved, so no symlink leads out).  The
bytes must start as PNG, JPEG, GIF, BMP or WebP does, and fit the byte and pixel limits read
from the header (Pillow reads it without decoding the pixels).  The checked image travels on
as a `data:` URL; WebP, which llama.cpp's image loader cannot read, is converted to PNG.
"""

from __future__ import annotations

import base64
import io
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infmllm_gguf.vision import image_from_url

__all__ = ["MediaError", "MediaPolicy"]

# Pillow's format name -> what the image travels on as
FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "BMP": "image/bmp", "WEBP": None}
MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")  # and RIFF....WEBP


class MediaError(ValueError):
    """An image the server will not take (the message says why)."""


@dataclass(frozen=True)
class MediaPolicy:
    max_images: int
    max_bytes: int
    max_pixels: int
    root: Path | None = None  # --media-path, resolved

    def prepare(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The messages with every image part checked and given as a data: URL."""
        out, n_images = [], 0
        for message in messages:
            content = message.get("content")
            if not isinstance(content, list):
                out.append(message)
                continue
            parts = []
            for part in content:
                if part.get("type") == "image_url":
                    n_images += 1
                    if n_images > self.max_images:
                        raise MediaError(f"at most {self.max_images} images are taken per request")
                    url = part["image_url"]
                    url = url["url"] if isinstance(url, dict) else url
                    part = {"type": "image_url", "image_url": {"url": self.checked_url(url)}}
                parts.append(part)
            out.append({**message, "content": parts})
        return out

    def checked_url(self, url: str) -> str:
        inline = url.startswith("data:")
        data = image_from_url(url) if inline else self._read_local(url)
        if len(data) > self.max_bytes:
            raise MediaError(f"an image of {len(data)} bytes or more exceeds the limit of {self.max_bytes}")
        mime = self._check(data)
        if mime is None:
            return _data_url(_as_png(data), "image/png")
        return url if inline else _data_url(data, mime)

    def _read_local(self, url: str) -> bytes:
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme in ("http", "https", "ftp"):
            raise MediaError(f"{scheme} image URLs are not fetched: send the image as a data: URL")
        if self.root is None:
            raise MediaError(
                "local image files are not served (the server has no --media-path): "
                "send the image as a data: URL"
            )
        path = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path) if scheme == "file" else url)
        try:
            resolved = (self.root / path).resolve(strict=True)  # an absolute path replaces root
        except (OSError, RuntimeError):
            raise MediaError(f"no image file {str(path)!r} under the media path") from None
        if not resolved.is_relative_to(self.root) or not resolved.is_file():
            raise MediaError(f"no image file {str(path)!r} under the media path")
        try:
            fd = os.open(resolved, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as fh:
                return fh.read(self.max_bytes + 1)  # one byte more tells it is too large
        except OSError as exc:
            raise MediaError(f"cannot read the image file {str(path)!r}: {exc.strerror}") from None

    def _check(self, data: bytes) -> str | None:
        """The image's MIME type (None for WebP) after the magic, header and pixel checks."""
        if not (data.startswith(MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")):
            raise MediaError("an image must be PNG, JPEG, GIF, BMP or WebP")
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                kind, (width, height) = image.format, image.size
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise MediaError(f"the image's header cannot be read: {exc}") from None
        if kind not in FORMATS:
            raise MediaError(f"{kind} images are not taken: send PNG, JPEG, GIF, BMP or WebP")
        if width * height > self.max_pixels:
            raise MediaError(f"an image of {width}x{height} pixels exceeds the limit of {self.max_pixels}")
        return FORMATS[kind]


def _as_png(data: bytes) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        out = io.BytesIO()
        image.convert("RGB").save(out, "PNG")
    return out.getvalue()


def _data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"
