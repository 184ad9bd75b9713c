"""A closed-form vision tower: an mmproj whose "image tokens" are the text model's own token embeddings.

`write_codebook_mmproj` writes a llama.cpp CLIP-format mmproj (LLaVA ``mlp`` projector) that reads
a picture of glyphs, one 14x14 patch per word, and hands the text model, for each patch, exactly the
input embedding of the token the glyph stands for. A picture of a sentence is then equivalent to the
sentence as text, so how the KV-cache policies treat image tokens can be measured offline against
a known answer (the text twin), with the real mtmd encoder and no vision model to download. It sees
nothing: real visual understanding needs a real LLaVA-style GGUF and its mmproj.

The weights. A glyph codes its token id in 18 bits: inside a 1-pixel white border, a 6x6 grid of
2x2-pixel cells holds 18 vertical dominoes (bit b: column b % 6, band b // 6; black over white is 1,
white over black is 0), so every glyph is half black. The F16 patch convolution gives one value per
cell, its mean brightness (R/4 + G/2 + B/4, normalised to -1 black .. +1 white); zero position
embeddings; ``v.pre_ln`` (epsilon 1e-9) makes the 36 values contrast- and brightness-invariant and
leaves a clean glyph's +-1 exact. ``block_count=1`` runs no transformer layer (the llava graph
feeds the projector the second-to-last layer). ``mm.0`` has one matched filter per coded token:
8 x the glyph's cell signs, bias -8 x 34, so the token's own glyph gives exactly 16 and any other
glyph -16 or less, where ggml's GELU is exactly x or 0. ``mm.2``'s columns are the dequantized
``token_embd`` rows / 16, so the projector's output is the embedding row itself, bit for bit.

Words are coded as the model writes them in running text: " the" (one token with its leading
space), punctuation bare ("." after a word has no space), digits bare (SmolLM2 writes " 4" as
" " + "4", so a rendered "is 1 2 3 4" reads as " is1234", tokenised as the same digit tokens).
Unused patches carry the pad glyph, a newline token: the sentence ends with blank lines.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:
    import gguf
    from PIL import Image
except ImportError as e:  # pragma: no cover - depends on the environment
    hint = 'pip install "infmllm-gguf[vision]"'
    raise ImportError(f"infmllm_gguf.codebook needs gguf and pillow: {hint} ({e})") from e

from infmllm_gguf._llama_cpp import llama_cpp as lc
from infmllm_gguf._llama_cpp._internals import LlamaModel
from infmllm_gguf.synthetic import finish, mlp_projector

PATCH = 14
BITS = 18  # token ids below 262,144
CELLS = 6  # a 6x6 grid of 2x2-pixel cells inside a 1-pixel border
GAIN = 8.0  # matched filter: the coded glyph gives 2*GAIN = 16, any other <= -16 (GELU exact)
PAD_TEXT = "\n"
KEY = "infmllm.codebook"

DEFAULT_WORDS: tuple[str, ...] = tuple(
    """
    I The A It He She We They You This That There What Who Where When Why How Yes No
    the of and to a in is it you that he was for on are with as his they be at one have this from
    or had by not word but what some we can out other were all there when up use your how said an
    each she which do their time if will way about many then them write would like so these her
    long make thing see him two has look more day could go come did number sound no most people my
    over know water than call first who may down side been now find any new work part take get
    place made live where after back little only round man year came show every good me give our
    under name very through just form great think say help low line turn cause much mean before
    move right boy old too same tell does set three want air well also play small end put home read
    hand large add even land here must big high such follow act why ask men change went light kind
    off need house picture try us again animal point mother world near build self earth father head
    stand own page should country found answer school grow study still learn plant cover food sun
    four between state keep eye never last let thought city tree cross farm hard start might story
    saw far sea draw left late run while press close night real life few north open seem together
    next white children begin got walk example paper group always music those both mark often
    letter until mile river car feet care second book carry took science eat room friend began idea
    fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl
    young ready above ever red list though feel talk bird soon body dog family leave song door black
    short class wind question happen complete ship area half rock order fire south problem piece
    told knew pass since top whole king space heard best hour better true during hundred five
    remember step early hold west ground reach fast sing six table travel less morning ten simple
    several war against slow center love person money road map rain rule cold voice town fine
    certain fly fall lead dark note wait plan star box field rest able done drive stood front week
    green quick warm free minute strong mind behind clear street full blue moon island foot test
    boat gold dry laugh ran game hot cat sat mat key code door vault secret color seven eight nine
    0 1 2 3 4 5 6 7 8 9 . , ! ? : ;
    """.split()
)


@dataclass(frozen=True)
class Codebook:
    """What a codebook mmproj codes: words and their token ids, the pad token, the picture's grid."""

    words: tuple[str, ...]
    tokens: tuple[int, ...]
    pad_token: int
    grid: int
    model_embd_sha256: str  # of the text model's token_embd tensor: the model it was made for

    def as_dict(self) -> dict[str, int]:
        """Word -> token id."""
        return dict(zip(self.words, self.tokens))


def _cells(token: int) -> np.ndarray:
    """The 6x6 cell signs of a token's glyph, +1 white and -1 black (see the module docstring)."""
    if not 0 <= token < 1 << BITS:
        raise ValueError(f"token {token} does not fit in {BITS} bits")
    top = np.where((token >> np.arange(BITS)) & 1, -1, 1).reshape(BITS // CELLS, CELLS)
    return np.stack([top, -top], axis=1).reshape(CELLS, CELLS)


def _glyph(token: int) -> np.ndarray:
    """A token's 14x14 glyph, uint8 grey levels (0 black, 255 white)."""
    white = np.pad(np.kron(_cells(token), np.ones((2, 2), dtype=int)), 1, constant_values=1) > 0
    return np.where(white, 255, 0).astype(np.uint8)


@functools.lru_cache(maxsize=4)
def _read_token_embd(path: Path, size: int, mtime_ns: int) -> gguf.ReaderTensor:
    return next(t for t in gguf.GGUFReader(path).tensors if t.name == "token_embd.weight")


def _token_embd(model_path: str | Path) -> gguf.ReaderTensor:
    """A GGUF's token_embd tensor, memory-mapped; cached, as gguf-py takes seconds to parse a vocabulary."""
    path = Path(model_path).resolve()
    stat = path.stat()
    return _read_token_embd(path, stat.st_size, stat.st_mtime_ns)


def token_embeddings(model_path: str | Path, tokens: Sequence[int]) -> np.ndarray:
    """The text model's input embeddings of `tokens` (token_embd rows dequantized by gguf, as llama.cpp's)."""
    embd = _token_embd(model_path)
    return gguf.quants.dequantize(embd.data[list(tokens)], embd.tensor_type).reshape(len(tokens), -1)


def model_embd_sha256(model_path: str | Path) -> str:
    """SHA-256 of a GGUF's token_embd tensor data: identifies the text model a codebook is for."""
    return hashlib.sha256(np.ascontiguousarray(_token_embd(model_path).data)).hexdigest()


def _word_tokens(model_path: Path, words: Sequence[str]) -> tuple[list[int], int]:
    """Each word's token in running text, and the pad token; ValueError names words that are not one."""
    params = lc.llama_model_default_params()
    params.vocab_only = True
    model = LlamaModel(path_model=str(model_path), params=params, verbose=False)
    try:

        def tokenize(text: str) -> list[int]:
            return model.tokenize(text.encode(), add_bos=False, special=False)

        space = tokenize(" ")
        tokens, bad = [], []
        for word in words:
            toks = tokenize(" " + word if word[:1].isalnum() else word)
            if len(toks) == len(space) + 1 and toks[: len(space)] == space:
                toks = toks[len(space) :]  # a digit: " 4" is " " + "4"
            if len(toks) == 1:
                tokens.append(toks[0])
            else:
                bad.append(word)
        pad = tokenize(PAD_TEXT)
    finally:
        model.close()
    if bad:
        raise ValueError(f"not one token of this model in running text: {bad}")
    assert len(pad) == 1, "the pad text must be one token"
    return tokens, pad[0]


def write_codebook_mmproj(
    model_path: str | Path, out_path: str | Path, words: Sequence[str] | None = None, grid: int = 4
) -> Path:
    """Write the codebook mmproj for `words` (default: DEFAULT_WORDS), pictures of grid x grid words."""
    model_path, out_path = Path(model_path), Path(out_path)
    if grid < 1:
        raise ValueError(f"grid {grid}: a picture needs at least one patch")
    words = list(dict.fromkeys(DEFAULT_WORDS if words is None else words))
    if not words:
        raise ValueError("a codebook needs at least one word")
    tokens, pad = _word_tokens(model_path, words)
    coded = sorted(set(tokens) | {pad})  # one hidden unit per coded token
    rows = token_embeddings(model_path, coded)
    n_embd = rows.shape[1]

    n_v = CELLS * CELLS  # vision embedding: one value per glyph cell
    masks = np.zeros((n_v, PATCH, PATCH), dtype=np.float32)
    for k in range(n_v):
        r, c = divmod(k, CELLS)
        masks[k, 1 + 2 * r : 3 + 2 * r, 1 + 2 * c : 3 + 2 * c] = 1
    rgb = np.array([1 / 16, 1 / 8, 1 / 16], dtype=np.float32)  # x 4 pixels: R/4 + G/2 + B/4, exact in F16

    w = mlp_projector(out_path, "infmllm codebook", n_v, n_embd, grid, PATCH)
    w.add_description(f"closed-form codebook vision tower: {len(words)} words as token embeddings")
    w.add_array(f"{KEY}.words", words)
    w.add_array(f"{KEY}.tokens", tokens)
    w.add_uint32(f"{KEY}.pad_token", pad)
    w.add_string(f"{KEY}.model_embd_sha256", model_embd_sha256(model_path))
    w.add_array(f"{KEY}.model_embd_shape", [int(n) for n in _token_embd(model_path).shape[::-1]])

    w.add_tensor("v.patch_embd.weight", (masks[:, None] * rgb[None, :, None, None]).astype(np.float16))
    w.add_tensor("v.position_embd.weight", np.zeros((grid * grid, n_v), dtype=np.float32))
    filters = np.stack([_cells(t).ravel() for t in coded]).astype(np.float32)
    w.add_tensor("mm.0.weight", GAIN * filters)
    w.add_tensor("mm.0.bias", np.full(len(coded), -GAIN * (n_v - 2), dtype=np.float32))
    w.add_tensor("mm.2.weight", np.ascontiguousarray(rows.T / (2 * GAIN), dtype=np.float32))
    w.add_tensor("mm.2.bias", np.zeros(n_embd, dtype=np.float32))
    finish(w)
    return out_path


def load_codebook(mmproj_path: str | Path) -> Codebook:
    """The codebook recorded in a codebook mmproj's metadata."""
    reader = gguf.GGUFReader(mmproj_path)

    def field(key: str):
        f = reader.get_field(key)
        if f is None:
            raise ValueError(f"{mmproj_path} is not a codebook mmproj (no {key})")
        return f.contents()

    return Codebook(
        words=tuple(field(f"{KEY}.words")),
        tokens=tuple(int(t) for t in field(f"{KEY}.tokens")),
        pad_token=int(field(f"{KEY}.pad_token")),
        grid=int(field("clip.vision.image_size")) // int(field("clip.vision.patch_size")),
        model_embd_sha256=field(f"{KEY}.model_embd_sha256"),
    )


def read_codebook(mmproj_path: str | Path) -> dict[str, int]:
    """Word -> token id of a codebook mmproj."""
    return load_codebook(mmproj_path).as_dict()


def render_words(text_or_words: str | Sequence[str], mmproj_path: str | Path) -> Image.Image:
    """The picture of a str (split on whitespace) or a list of words: one glyph per patch, row-major,
    padded with the pad glyph, exactly the mmproj's image size (mtmd resamples any other size, after
    which the embeddings keep their direction but not their exact values)."""
    book = load_codebook(mmproj_path)
    words = text_or_words.split() if isinstance(text_or_words, str) else list(text_or_words)
    codes = book.as_dict()
    unknown = [w for w in words if w not in codes]
    if unknown:
        raise ValueError(f"words not in the codebook: {unknown}")
    if len(words) > book.grid**2:
        raise ValueError(f"{len(words)} words do not fit in a {book.grid}x{book.grid} picture")
    tokens = [codes[w] for w in words] + [book.pad_token] * (book.grid**2 - len(words))
    patches = np.stack([_glyph(t) for t in tokens]).reshape(book.grid, book.grid, PATCH, PATCH)
    grey = patches.transpose(0, 2, 1, 3).reshape(book.grid * PATCH, book.grid * PATCH)
    return Image.fromarray(grey).convert("RGB")
