"""Images through libmtmd: a projector (mmproj GGUF) beside the text model turns pictures into
the text model's input embeddings, which the stream decodes as ordinary cells.

mtmd does the model-specific work (preprocessing, the vision tower, chunking a prompt into text
and image chunks, wrapper tokens some families put around an image); this module only owns the
native objects and hands out numpy arrays.  Each image gets a key from a hash of its pixels, so
a prompt that repeats a picture already in the stream is matched without encoding it again.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import hashlib
import logging
import os
import sys
import urllib.parse
import weakref
from collections import deque
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from infmllm_gguf._llama_cpp import _logger
from infmllm_gguf._llama_cpp import llama_cpp as lc

ImageLike = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, Any]
"""A path, encoded image bytes (PNG, JPEG, BMP, ... as stb_image reads them), an HxWx3 uint8
array, or a PIL image."""

_GGML_LOG_ERROR = 4  # enum ggml_log_level of the pinned ggml
_errors: deque[str] = deque(maxlen=8)


@lc.llama_log_callback
def _log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """mtmd's log: errors are kept for the exception that follows them; the rest shows when verbose."""
    message = text.decode("utf-8", "replace")
    if level == _GGML_LOG_ERROR:
        _errors.append(message.strip())
    if _logger.logger.isEnabledFor(logging.DEBUG):
        print(message, end="", file=sys.stderr, flush=True)


class _Mtmd:
    """libmtmd's ctypes bindings, loaded on first use: text-only sessions never need the library
    (the sanitizer build has none), and an error says so only where images are asked for."""

    _module: Any = None

    def __getattr__(self, name: str) -> Any:
        if _Mtmd._module is None:
            try:
                from infmllm_gguf._llama_cpp import mtmd_cpp
            except (OSError, RuntimeError) as exc:
                raise ImportError(f"this build has no libmtmd, which images need: {exc}") from exc
            _Mtmd._module = mtmd_cpp
            _route_logs()
        return getattr(_Mtmd._module, name)


mt = _Mtmd()


def _route_logs() -> None:
    """(Re)install our log callback: another user of libmtmd in the process may have replaced it."""
    mt.mtmd_log_set(_log, None)
    mt.mtmd_helper_log_set(_log, None)


def _last_error() -> str:
    return _errors[-1] if _errors else "see the log (verbose=True)"


def image_key(digest: bytes) -> int:
    """The stream's key for an image: negative, from the first 31 bits of its content digest."""
    return -1 - (int.from_bytes(digest[:4], "little") & 0x7FFFFFFF)


@dataclass(frozen=True)
class TextPart:
    tokens: np.ndarray  # int32 token ids

    def __len__(self) -> int:
        return len(self.tokens)

    def keys(self) -> np.ndarray:
        return self.tokens


@dataclass(frozen=True)
class ImagePart:
    """One image of a prompt as mtmd chunked it, not encoded yet (`Projector.encode`).

    It owns a copy of its native chunk, freed when the part is garbage-collected."""

    chunk: int  # mtmd_input_chunk *
    n_tokens: int
    key: int
    non_causal: bool
    n_pos: int  # positions it takes: n_tokens, or fewer for M-RoPE (max of its grid's sides)

    def __post_init__(self) -> None:
        weakref.finalize(self, mt.mtmd_input_chunk_free, self.chunk)

    def __len__(self) -> int:
        return self.n_tokens

    def keys(self) -> np.ndarray:
        return np.full(self.n_tokens, self.key, np.int32)


Part = Union[TextPart, ImagePart]


class Projector:
    """An mmproj GGUF loaded through libmtmd for one text model."""

    def __init__(
        self, path: str | os.PathLike, model: int, n_embd: int, n_threads: int, use_gpu: bool = True
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"mmproj file not found: {self.path}")
        with open(self.path, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ValueError(f"{self.path} is not a GGUF file")
        params = mt.mtmd_context_params_default()
        params.use_gpu = use_gpu  # the first GPU device where the build has one, else the CPU
        params.print_timings = False
        params.n_threads = n_threads
        params.warmup = False
        _route_logs()
        _errors.clear()
        ctx = mt.mtmd_init_from_file(str(self.path).encode(), model, params)
        if not ctx:
            raise ValueError(
                f"could not load the projector {self.path}: {_last_error()} (it must be an mmproj GGUF "
                f"made for this text model, whose embedding width is {n_embd})"
            )
        self._ctx = ctx
        if not mt.mtmd_support_vision(ctx):
            self.close()
            raise ValueError(f"{self.path} has no vision encoder (audio-only projectors are not supported)")
        self.n_embd = n_embd
        self._marker = (mt.mtmd_default_marker() or b"<__media__>").decode()

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            mt.mtmd_free(self._ctx)
            self._ctx = None

    def __del__(self) -> None:
        self.close()

    # --- pictures ------------------------------------------------------------------------
    @contextmanager
    def bitmap(self, image: ImageLike) -> Iterator[int]:
        """An mtmd bitmap of image (freed on exit), its id set to a hash of its pixels."""
        bmp = self._load(image)
        try:
            data = mt.mtmd_bitmap_get_data(bmp)
            n = mt.mtmd_bitmap_get_n_bytes(bmp)
            size = f"{mt.mtmd_bitmap_get_nx(bmp)}x{mt.mtmd_bitmap_get_ny(bmp)}".encode()
            digest = hashlib.sha256(size + ctypes.string_at(data, n)).hexdigest()
            mt.mtmd_bitmap_set_id(bmp, digest.encode())
            yield bmp
        finally:
            mt.mtmd_bitmap_free(bmp)

    def _load(self, image: ImageLike) -> int:
        if isinstance(image, (str, os.PathLike)):
            path = Path(image)
            if not path.is_file():
                raise FileNotFoundError(f"image file not found: {path}")
            image = path.read_bytes()
        if isinstance(image, (bytes, bytearray, memoryview)):
            data = bytes(image)
            if not data:
                raise ValueError("the image is empty (0 bytes)")
            buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
            _errors.clear()
            bmp = mt.mtmd_helper_bitmap_init_from_buf(self._ctx, buf, len(data), False)
            if not bmp:
                raise ValueError(f"could not decode the image ({len(data)} bytes): {_last_error()}")
            return bmp
        if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
            image = np.asarray(image.convert("RGB"))
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
                raise ValueError(f"an image array must be H x W x 3 uint8, got {image.shape} {image.dtype}")
            pixels = np.ascontiguousarray(image)
            bmp = mt.mtmd_bitmap_init(
                pixels.shape[1], pixels.shape[0], pixels.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
            )
            if not bmp:
                raise ValueError("mtmd could not make a bitmap of the image array")
            return bmp
        raise TypeError(
            "an image is a path, encoded bytes, an H x W x 3 uint8 numpy array or a PIL image, "
            f"not {type(image).__name__}"
        )

    # --- prompts -------------------------------------------------------------------------
    def tokenize(self, text: str, images: list[ImageLike], add_special: bool) -> list[Part]:
        """Split text, whose i-th `marker` stands for images[i], into text and image parts."""
        n_markers = text.count(self.marker)
        if n_markers != len(images):
            raise ValueError(f"the prompt has {n_markers} image markers for {len(images)} images")
        with ExitStack() as stack:
            bitmaps = [stack.enter_context(self.bitmap(image)) for image in images]
            chunks = mt.mtmd_input_chunks_init()
            stack.callback(mt.mtmd_input_chunks_free, chunks)
            data = text.encode()
            inp = mt.mtmd_input_text(data, len(data), add_special, True)
            arr = (mt.mtmd_bitmap_p_ctypes * max(len(bitmaps), 1))(*bitmaps)
            _errors.clear()
            rc = mt.mtmd_tokenize(self._ctx, chunks, ctypes.byref(inp), arr, len(bitmaps))
            if rc != 0:
                raise ValueError(f"mtmd could not tokenise the prompt (status {rc}): {_last_error()}")
            n_chunks = mt.mtmd_input_chunks_size(chunks)
            parts = [self._part(mt.mtmd_input_chunks_get(chunks, i)) for i in range(n_chunks)]
        return [p for p in parts if len(p)]

    def _part(self, chunk: int) -> TextPart | ImagePart:
        kind = mt.mtmd_input_chunk_get_type(chunk)
        if kind == mt.MTMD_INPUT_CHUNK_TYPE_TEXT:
            n = ctypes.c_size_t()
            ptr = mt.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
            return TextPart(np.ctypeslib.as_array(ptr, shape=(n.value,)).astype(np.int32))
        if kind != mt.MTMD_INPUT_CHUNK_TYPE_IMAGE:
            raise ValueError("audio chunks are not supported")
        n_tokens = mt.mtmd_input_chunk_get_n_tokens(chunk)
        chunk_id = mt.mtmd_input_chunk_get_id(chunk) or b""
        return ImagePart(
            chunk=mt.mtmd_input_chunk_copy(chunk),
            n_tokens=n_tokens,
            key=image_key(bytes.fromhex(chunk_id.decode())) if chunk_id else image_key(os.urandom(4)),
            non_causal=bool(mt.mtmd_decode_use_non_causal(self._ctx, chunk)),
            n_pos=mt.mtmd_input_chunk_get_n_pos(chunk),
        )

    @property
    def marker(self) -> str:
        """The text that stands for an image in a prompt."""
        return self._marker

    def mrope_positions(self, part: ImagePart, pos_0: int) -> np.ndarray:
        """An M-RoPE image's decoder positions from pos_0: 4 x n_tokens (sections t, y, x, z, as
        llama_batch takes them section-major)."""
        tokens = mt.mtmd_input_chunk_get_tokens_image(part.chunk)
        txyz = np.empty((part.n_tokens, 4), np.uint32)  # mtmd_decoder_pos {t, x, y, z} per token
        mt.mtmd_helper_image_get_decoder_pos(
            tokens, pos_0, txyz.ctypes.data_as(ctypes.POINTER(mt.mtmd_decoder_pos))
        )
        return np.ascontiguousarray(txyz[:, [0, 2, 1, 3]].T, np.int32)

    def encode(self, part: ImagePart) -> np.ndarray:
        """The image's embeddings in the text model's input space (n_tokens x n_embd, float32)."""
        _errors.clear()
        rc = mt.mtmd_encode_chunk(self._ctx, part.chunk)
        if rc != 0:
            raise RuntimeError(f"mtmd could not encode the image (status {rc}): {_last_error()}")
        ptr = mt.mtmd_get_output_embd(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(part.n_tokens, self.n_embd)).copy()


def image_from_url(url: str) -> ImageLike:
    """An OpenAI `image_url`: a `data:` URL, a `file://` URL or a local path; never a network fetch."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"an image_url must be a non-empty string, got {url!r}")
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep:
            raise ValueError("a data: URL needs a ',' before its payload")
        if header.endswith(";base64"):
            try:
                return base64.b64decode(payload, validate=True)
            except binascii.Error as exc:
                raise ValueError(f"the data: URL's base64 payload is invalid: {exc}") from exc
        return urllib.parse.unquote_to_bytes(payload)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https", "ftp"):
        raise ValueError(
            f"{scheme} image URLs are not fetched (no network access): download the image and pass "
            "its path or a data: URL"
        )
    if scheme == "file":
        return Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
    return Path(url)


def flatten_messages(messages: list[dict], marker: str | None) -> tuple[list[dict], list[ImageLike]]:
    """Chat messages with string contents for the chat template, each image part replaced by
    `marker`, and the images in order.  Without a marker (no projector) an image part is an error."""
    flat: list[dict] = []
    images: list[ImageLike] = []
    if not isinstance(messages, list):
        raise ValueError(
            f"messages must be a list of {{'role': ..., 'content': ...}}, got {type(messages).__name__}"
        )
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"each message must be a dict with a 'role' string, got {message!r:.80}")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise ValueError(f"a message's content must be a string or a list of parts, got {content!r:.80}")
        if isinstance(content, list):
            texts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    texts.append(str(part.get("text", "")))
                elif kind == "image_url":
                    if marker is None:
                        raise ValueError("an image_url part needs a projector: pass mmproj_path to Llama")
                    url = part.get("image_url")
                    images.append(image_from_url(url.get("url") if isinstance(url, dict) else url))
                    texts.append(marker)
                else:
                    raise ValueError(f"unsupported content part {part!r}: use 'text' or 'image_url'")
            message = {**message, "content": "\n".join(texts)}
        flat.append(message)
    return flat, images
