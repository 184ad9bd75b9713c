"""Images and video in the bounded stream, with the closed-form codebook projector (real mtmd,
real SmolLM2): a picture of words reaches the model as exactly those words' embeddings, so what
the cache keeps of an image can be checked against text."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from infmllm_gguf._llama_cpp import llama_cpp as lc
from reference import AttentionCapture

from infmllm_gguf import Llama, StreamingLLM
from infmllm_gguf.codebook import load_codebook, render_words
from infmllm_gguf.kv import KVCache, decode
from infmllm_gguf.video import write_video
from infmllm_gguf.vision import Projector

QUESTION = "\nQuestion: what is the vault code?\nAnswer: the vault code is"


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def vlm(model_path, codebook_mmproj):
    llm = Llama(model_path, n_ctx=1024, kv_policy="full", mmproj_path=codebook_mmproj, debug=True)
    yield llm
    llm.close()


def test_image_cells_are_counted_and_marked(vlm, codebook_mmproj):
    vlm.reset()
    picture = render_words("the vault code is 4 7 2 1", codebook_mmproj)
    n_text = len(vlm.tokenize("A picture:", add_bos=True, special=True))
    added = vlm.feed_image(picture, prompt="A picture:")
    n_image = added - n_text
    assert n_image == picture.size[0] // 14 * picture.size[1] // 14  # one token per patch, as mtmd reports
    view = vlm.session.stream.view()
    assert view.is_image.sum() == n_image and np.all(view.media[n_text:] == 1)
    assert not view.is_image[:n_text].any()
    assert np.all(vlm.history[n_text:] < 0)
    assert vlm.kv_stats()["images"] == 1


def twin(words: str, mmproj) -> list[int]:
    """The tokens a codebook picture of words stands for, pads included."""
    book = load_codebook(mmproj)
    tokens = [book.as_dict()[w] for w in words.split()]
    return tokens + [book.pad_token] * (book.grid**2 - len(tokens))


@pytest.mark.parametrize("source", ["pil", "array", "png_bytes", "path"])
def test_a_codebook_picture_is_read_like_its_text_twin(vlm, codebook_mmproj, tmp_path, source):
    """The next-token logits after the picture equal those after the same tokens as text, and so
    does the greedy answer to a question about it."""
    words = "the vault code is 4 7 2 1 ."
    picture = render_words(words, codebook_mmproj)
    image = {
        "pil": picture,
        "array": np.asarray(picture.convert("RGB")),
        "png_bytes": png_bytes(picture),
        "path": tmp_path / "code.png",
    }[source]
    if source == "path":
        picture.save(image)
    vlm.reset()
    vlm.feed_image(image, prompt="Note:")
    image_logits = vlm.session.stream.last_logits.copy()
    vlm.feed(QUESTION, add_bos=False)
    image_answer = vlm.generate_text(6)

    vlm.reset()
    vlm.feed("Note:")
    vlm.eval(twin(words, codebook_mmproj))
    text_logits = vlm.session.stream.last_logits.copy()
    vlm.feed(QUESTION, add_bos=False)
    text_answer = vlm.generate_text(6)
    np.testing.assert_allclose(image_logits, text_logits, atol=1e-3 * np.abs(text_logits).max())
    assert image_answer == text_answer
    assert "".join(ch for ch in image_answer if ch.isdigit()).startswith("4721")


def test_compaction_re_rotates_image_cells_like_text(make_ctx, model, text_tokens, codebook_mmproj):
    """Evict a random set of text and image cells and compact: every kept cell's layer-0 key,
    image cells included, equals the key a fresh context computes for the same input at the
    new position (keys there depend on the input and the position only)."""
    projector = Projector(codebook_mmproj, model, lc.llama_model_n_embd_inp(model), 1)
    picture = render_words("the vault code is 4 7 2 1", codebook_mmproj)
    [part] = projector.tokenize(projector.marker, [picture], False)
    embd = projector.encode(part)
    projector.close()
    before, after, nxt = text_tokens[:60], text_tokens[60:100], text_tokens[100:101]
    inputs = [before, embd, after]  # positions 0..59, 60..75, 76..115
    n_all = 116

    def feed(ctx, keep):
        """Decode the inputs whose stream index is in keep, at positions 0.. in order."""
        pos = 0
        for start, piece in zip((0, 60, 76), inputs):
            rows = [i - start for i in keep if start <= i < start + len(piece)]
            if rows:
                decode(ctx, piece[rows], pos + np.arange(len(rows)))
                pos += len(rows)

    cap = AttentionCapture(flash_attn=False)
    ctx = make_ctx(n_ctx=512, cb_eval=cap.callback)
    kv = KVCache(ctx)
    feed(ctx, range(n_all))
    k_before = cap.layers[0]["k"][0].copy()
    victims = np.sort(np.random.default_rng(3).choice(np.arange(4, 110), size=40, replace=False))
    assert np.any((victims >= 60) & (victims < 76))  # some image cells go too
    kv.evict(victims)
    n = kv.compact()
    kept = np.setdiff1d(np.arange(n_all), victims)
    decode(ctx, nxt, [n])
    view = kv.cells()
    got = cap.layers[0]["k"][0][:, view.cells[:n], :]

    fresh_cap = AttentionCapture(flash_attn=False)
    fresh = make_ctx(n_ctx=512, cb_eval=fresh_cap.callback)
    feed(fresh, kept)
    want = fresh_cap.layers[0]["k"][0][:, :n, :]
    error = np.abs(got - want).max()
    assert error < 2e-3 * np.abs(want).max()  # F16 rounding of the re-rotated keys
    assert np.abs(k_before[:, view.cells[:n], :] - want).max() > 50 * error  # they really moved


def test_a_picture_is_still_read_after_eviction_and_compaction(model_path, codebook_mmproj):
    """The runtime's own path: text before a code picture is evicted, the picture moves to new
    positions, and the model still reads the code from it."""
    words = "the vault code is 4 7 2 1 ."
    policy = StreamingLLM(budget=64, chunk=32, sinks=4)
    llm = Llama(model_path, n_ctx=128, kv_policy=policy, mmproj_path=codebook_mmproj, debug=True)
    llm.feed("A long preamble that will be evicted. " * 12)
    llm.feed_image(render_words(words, codebook_mmproj), prompt=" Note:")
    position = llm.cached_stream_indices().tolist().index(int(np.flatnonzero(llm.history < 0)[0]))
    evictions = llm.kv_stats()["evictions"]
    filler = llm.tokenize(" and then some more words", add_bos=False)
    while llm.kv_stats()["evictions"] == evictions:  # until the next eviction: the picture moves down
        llm.eval(filler[:1])
        filler = filler[1:] + filler[:1]
    assert llm.kv_stats()["n_image_cells"] == 16
    llm.feed(QUESTION, add_bos=False)
    assert llm.cached_stream_indices().tolist().index(int(np.flatnonzero(llm.history < 0)[0])) < position
    answer = llm.generate_text(6)
    assert "".join(ch for ch in answer if ch.isdigit()).startswith("4721"), answer
    llm.close()


def test_protect_newest_image_keeps_the_latest_frame(model_path, codebook_mmproj):
    from infmllm_gguf import InfMLLM

    picture = render_words("red green blue", codebook_mmproj)
    for protect in (False, True):
        policy = InfMLLM(budget=48, chunk=32, recent=8, protect_newest_image=protect)
        llm = Llama(model_path, n_ctx=128, kv_policy=policy, mmproj_path=codebook_mmproj, debug=True)
        llm.feed("Frames follow.")
        llm.feed_image(picture, prompt=" Frame:")
        llm.feed(" " + "and then " * 12, add_bos=False)  # pushes the frame out of the recent window
        before = llm.kv_stats()["evictions"]
        llm.feed(" more " * 40, add_bos=False)
        assert llm.kv_stats()["evictions"] > before
        kept_image_cells = llm.kv_stats()["n_image_cells"]
        if protect:
            assert kept_image_cells == picture.size[0] // 14 * picture.size[1] // 14
        llm.close()


def test_chat_with_image_parts_reuses_the_encoded_prefix(vlm, codebook_mmproj):
    picture = render_words("the vault code is 4 7 2 1", codebook_mmproj)
    url = "data:image/png;base64," + base64.b64encode(png_bytes(picture)).decode()
    vlm.reset()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "Read it."},
            ],
        }
    ]
    first = vlm.create_chat_completion(messages, max_tokens=8, temperature=0)
    assert vlm.kv_stats()["images"] == 1
    messages += [first["choices"][0]["message"], {"role": "user", "content": "Thanks."}]
    vlm.create_chat_completion(messages, max_tokens=4, temperature=0)
    assert vlm.kv_stats()["images"] == 1  # the picture already in the stream was not fed again
    assert first["usage"]["prompt_tokens"] > 16


def test_bad_images_raise_and_leave_the_stream_as_it_was(vlm, model_path, codebook_mmproj, tmp_path):
    vlm.reset()
    vlm.feed("Some text first.")
    before = (vlm.history.copy(), vlm.session.stream.last_logits.copy())

    def unchanged():
        vlm.check_invariants()
        assert np.array_equal(vlm.history, before[0])
        assert np.array_equal(vlm.session.stream.last_logits, before[1])

    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    for bad, error in [
        (b"\x89PNG\r\n\x1a\n broken", ValueError),
        (b"", ValueError),
        (junk, ValueError),
        (tmp_path / "missing.png", FileNotFoundError),
        (np.zeros((8, 8), np.uint8), ValueError),
        (np.zeros((8, 8, 3), np.float32), ValueError),
        (42, TypeError),
    ]:
        with pytest.raises(error):
            vlm.feed_image(bad, prompt="This must not be fed either.")
        unchanged()
    with pytest.raises(ValueError, match="network"):
        vlm.create_chat_completion(
            [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}],
                }
            ]
        )
    unchanged()

    text_only = Llama(model_path, n_ctx=256, kv_policy="full")
    with pytest.raises(ValueError, match="mmproj_path"):
        text_only.feed_image(render_words("red", codebook_mmproj))
    text_only.close()

    policy = StreamingLLM(budget=12, chunk=16)
    small = Llama(model_path, n_ctx=64, kv_policy=policy, mmproj_path=codebook_mmproj)
    small.feed("Hello there.")
    with pytest.raises(ValueError, match="budget"):
        small.feed_image(render_words("red", codebook_mmproj), prompt=" Look:")
    assert small.n_cached == len(small.history) and small.kv_stats()["images"] == 0
    small.close()


def test_bad_projectors_are_refused(model_path, tmp_path):
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"nope")
    with pytest.raises(ValueError, match="GGUF"):
        Llama(model_path, n_ctx=256, mmproj_path=not_gguf)
    with pytest.raises(FileNotFoundError):
        Llama(model_path, n_ctx=256, mmproj_path=tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="projector"):
        Llama(model_path, n_ctx=256, mmproj_path=model_path)  # a GGUF, but a text model


def test_video_file_streams_frame_by_frame(model_path, codebook_mmproj, tmp_path):
    words = ["red green blue", "one two three four", "the cat sat", "we go home now"]
    pictures = [render_words(w, codebook_mmproj) for w in words for _ in range(6)]
    video = tmp_path / "clip.mp4"
    write_video(video, pictures, fps=4)
    policy = StreamingLLM(budget=128, chunk=32)
    llm = Llama(model_path, n_ctx=256, kv_policy=policy, mmproj_path=codebook_mmproj)
    seen = []
    stats = llm.feed_video(video, fps=1.0, on_frame=seen.append, progress=False)
    assert stats["frames"] == len(seen) == 6  # 24 frames at 4 fps, sampled at 1 fps
    assert [round(info["time"]) for info in seen] == list(range(6))
    assert stats["evictions"] > 0 and llm.n_cached <= 160
    llm.check_invariants()
    assert "[00:00:05]" in llm.detokenize([t for t in llm.history if t >= 0]).decode()

    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    n_before = len(llm.history)
    for bad in (empty, garbage):
        with pytest.raises(ValueError):
            llm.feed_video(bad, progress=False)
    with pytest.raises(ValueError, match="no frames"):
        llm.feed_video([], progress=False)
    assert len(llm.history) == n_before
    llm.close()


@pytest.mark.slow
def test_300_frame_video_stays_bounded(model_path, codebook_mmproj):
    words = ["red green blue", "one two three four", "the cat sat", "we go home now"]
    frames = (render_words(words[i % 4], codebook_mmproj) for i in range(300))
    llm = Llama(model_path, n_ctx=2048, kv_policy="infmllm", mmproj_path=codebook_mmproj, debug=True)
    sizes = []
    stats = llm.feed_video(frames, on_frame=lambda info: sizes.append(info["n_cached"]), progress=False)
    assert stats["frames"] == 300 and stats["evictions"] > 0
    assert max(sizes) <= llm.policy.capacity
    llm.close()


def test_rewind_never_splits_an_image(vlm, codebook_mmproj):
    vlm.reset()
    n = vlm.feed_image(render_words("the vault code is 4 7 2 1", codebook_mmproj), prompt="A picture:")
    with pytest.raises(ValueError, match="inside an image"):
        vlm.rewind(n - 3)
    assert vlm.n_streamed == n
    n_text = len(vlm.tokenize("A picture:", add_bos=True, special=True))
    assert vlm.rewind(n_text) and vlm.n_streamed == vlm.n_cached == n_text
    vlm.check_invariants()
