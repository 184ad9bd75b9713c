"""The codebook mmproj through mtmd's real encoder and the real SmolLM2: a picture is its text twin."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from conftest import logits_of
from infmllm_gguf._llama_cpp import llama_cpp as lc
from infmllm_gguf._llama_cpp import mtmd_cpp as mtmd

from infmllm_gguf.codebook import (
    load_codebook,
    model_embd_sha256,
    read_codebook,
    render_words,
    token_embeddings,
    write_codebook_mmproj,
)
from infmllm_gguf.kv import decode

SENTENCE = "the vault code is 4 2 7 1 . Where is the key ?"  # 14 words, 2 pads


@pytest.fixture(scope="module")
def mtmd_ctx(model, codebook_mmproj):
    params = mtmd.mtmd_context_params_default()
    params.use_gpu = False
    params.n_threads = 1  # a few small graphs: one thread does not stall on a busy machine
    params.print_timings = False
    ctx = mtmd.mtmd_init_from_file(str(codebook_mmproj).encode(), model, params)
    assert ctx, "mtmd could not load the codebook mmproj"
    yield ctx
    mtmd.mtmd_free(ctx)


def tokenize(model, text: str, bos: bool = False) -> list[int]:
    vocab = lc.llama_model_get_vocab(model)
    data = text.encode()
    buf = (lc.llama_token * (len(data) + 8))()
    n = lc.llama_tokenize(vocab, data, len(data), buf, len(buf), bos, False)
    return list(buf[:n])


def encode(ctx, model, image) -> tuple[int, np.ndarray]:
    """mtmd_tokenize + mtmd_encode_chunk of a picture: (number of chunks, image embeddings)."""
    rgb = np.ascontiguousarray(image, dtype=np.uint8)
    data = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb)
    bitmap = mtmd.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], data)
    chunks = mtmd.mtmd_input_chunks_init()
    marker = mtmd.mtmd_default_marker()
    text = mtmd.mtmd_input_text(marker, len(marker), False, True)
    try:
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1) == 0
        n_chunks = mtmd.mtmd_input_chunks_size(chunks)
        chunk = mtmd.mtmd_input_chunks_get(chunks, n_chunks - 1)
        assert mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE
        n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
        assert mtmd.mtmd_encode_chunk(ctx, chunk) == 0
        n_embd = lc.llama_model_n_embd(model)
        embd = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(ctx), shape=(n * n_embd,))
        return n_chunks, embd.reshape(n, n_embd).copy()
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)


def decode_embd(ctx, embd: np.ndarray, start: int) -> None:
    """llama_decode embeddings at positions start.., logits for the last."""
    n, n_embd = embd.shape
    batch = lc.llama_batch_init(n, n_embd, 1)
    try:
        batch.n_tokens = n
        ctypes.memmove(batch.embd, np.ascontiguousarray(embd, np.float32).ctypes.data, embd.nbytes)
        for i in range(n):
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == n - 1
        assert lc.llama_decode(ctx, batch) == 0
    finally:
        lc.llama_batch_free(batch)


def twin(codebook_mmproj, text: str) -> list[int]:
    book = load_codebook(codebook_mmproj)
    tokens = [book.as_dict()[w] for w in text.split()]
    return tokens + [book.pad_token] * (book.grid**2 - len(tokens))


def test_words_are_coded_as_the_model_tokenizes_running_text(model, codebook_mmproj):
    book = read_codebook(codebook_mmproj)
    text = " the vault code is4271. Where is the key?"  # digits are bare: " 4" is " " + "4"
    assert tokenize(model, text) == [book[w] for w in SENTENCE.split()]


def test_mtmd_encodes_a_picture_to_the_token_embeddings(model, model_path, mtmd_ctx, codebook_mmproj):
    image = render_words(SENTENCE, codebook_mmproj)
    assert image.size == (56, 56)
    n_chunks, embd = encode(mtmd_ctx, model, image)
    assert n_chunks == 1 and len(embd) == 16  # no begin/end-of-image tokens, one token per patch
    rows = token_embeddings(model_path, twin(codebook_mmproj, SENTENCE))
    cosine = (embd * rows).sum(1) / np.linalg.norm(embd, axis=1) / np.linalg.norm(rows, axis=1)
    print(f"cosine min {cosine.min():.9f}, max abs diff {np.abs(embd - rows).max():.3g}")
    assert cosine.min() >= 0.99
    np.testing.assert_array_equal(embd, rows)  # measured: bit-identical


def test_image_tokens_give_the_text_logits(model, make_ctx, mtmd_ctx, codebook_mmproj):
    prefix = tokenize(model, "Read the note below.\n", bos=True)
    tokens = twin(codebook_mmproj, SENTENCE)
    _, embd = encode(mtmd_ctx, model, render_words(SENTENCE, codebook_mmproj))
    ctx = make_ctx(n_ctx=256)
    lc.llama_set_n_threads(ctx, 1, 1)
    decode(ctx, prefix, range(len(prefix)))
    decode(ctx, tokens, range(len(prefix), len(prefix) + len(tokens)))
    text = logits_of(ctx, model)
    assert lc.llama_memory_seq_rm(lc.llama_get_memory(ctx), 0, len(prefix), -1)  # the same prefix cache
    decode_embd(ctx, embd, len(prefix))
    image = logits_of(ctx, model)
    print(f"max abs logit diff {np.abs(text - image).max():.3g} (logits up to {np.abs(text).max():.3g})")
    np.testing.assert_allclose(image, text, rtol=0, atol=1e-3 * np.abs(text).max())
    assert image.argmax() == text.argmax()


def test_render_words_refuses_unknown_words_and_overflow(codebook_mmproj):
    with pytest.raises(ValueError, match="flibbertigibbet"):
        render_words("the flibbertigibbet sat", codebook_mmproj)
    with pytest.raises(ValueError, match="17 words"):
        render_words(["the"] * 17, codebook_mmproj)


def test_metadata_round_trips(model, model_path, tmp_path):
    words = ["hello", "world", ".", "7"]
    path = write_codebook_mmproj(model_path, tmp_path / "small.gguf", words=words, grid=2)
    book = load_codebook(path)
    expected = [tokenize(model, " hello")[0], tokenize(model, " world")[0], *tokenize(model, ".7")]
    assert (book.words, list(book.tokens), book.grid) == (tuple(words), expected, 2)
    assert [book.pad_token] == tokenize(model, "\n")
    assert book.model_embd_sha256 == model_embd_sha256(model_path)
    assert render_words("hello world", path).size == (28, 28)
    with pytest.raises(ValueError, match="flibbertigibbet"):
        write_codebook_mmproj(model_path, tmp_path / "bad.gguf", words=["flibbertigibbet"])
