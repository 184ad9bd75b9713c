"""The CLI commands run on the real model and emit the documented JSON keys; chat survives Ctrl-C/D."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pexpect
import pytest

from infmllm_gguf import Llama
from infmllm_gguf.cli import main
from infmllm_gguf.evaluate import PASSKEY_PREAMBLE, passkey_tokens
from infmllm_gguf.texts import kjv


def run_json(tmp_path, *args) -> dict:
    out = tmp_path / "out.json"
    assert main([*args, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_ppl_json(tmp_path):
    result = run_json(tmp_path, "ppl", "--policy", "infmllm", "--budget", "128", "--max-tokens", "1100")
    for key in ("policy", "budget", "n_tokens", "ppl", "tokens_per_s", "peak_rss_mb", "buckets"):
        assert key in result
    assert result["policy"] == "infmllm" and result["n_tokens"] == 1100
    assert len(result["buckets"]) == 1 and 1 < result["ppl"] < 100  # one whole 1000-token bucket
    assert result["kv"]["evictions"] > 0
    assert result["reposition"] and result["kv"]["max_pos"] < 128 + 16


@pytest.mark.slow  # a long stream: the slow suite
def test_ppl_without_repositioning(tmp_path):
    args = ("ppl", "--policy", "streamingllm", "--budget", "128", "--max-tokens", "1500", "--no-reposition")
    result = run_json(tmp_path, *args)
    assert not result["reposition"] and result["kv"]["evictions"] > 0
    assert result["kv"]["max_pos"] == 1499 and 1 < result["ppl"] < 100  # positions grew with the stream


@pytest.mark.slow  # a long stream: the slow suite
def test_ppl_with_chunk_recall_between_evictions(tmp_path):
    args = ("ppl", "--budget", "128", "--max-tokens", "1500", "--recall", "--recall-when", "chunk")
    result = run_json(tmp_path, *args, "--recall-score", "text", "--recall-every", "8")
    assert result["kv"]["recalls"] > result["kv"]["evictions"] > 0  # two recalls per chunk of 16
    assert 1 < result["ppl"] < 100


def test_passkey_json(tmp_path):
    result = run_json(
        tmp_path,
        "passkey",
        "--length",
        "200",
        "--depths",
        "0.5",
        "--trials",
        "4",
        "--policy",
        "full",
        "--budget",
        "512",
    )
    assert set(result) >= {"accuracy", "trials"}
    assert len(result["trials"]) == 4
    assert {"depth", "key", "answer", "correct"} <= set(result["trials"][0])
    # the full context finds most needles in a short haystack; which one it reads as part of
    # the text (inline, "the night.") differs between CPUs' rounding
    assert result["accuracy"] >= 0.75


def test_a_passkey_stream_with_the_preamble_keeps_its_length_and_needle():
    llm = Llama(n_ctx=512, kv_policy="full", seed=0)
    filler = llm.tokenize(kjv()[:20_000], add_bos=False)
    plain, _ = passkey_tokens(llm, filler, 1000, 0.5, "12345", paragraphs=True, start=7)
    tokens, needle = passkey_tokens(llm, filler, 1000, 0.5, "12345", paragraphs=True, start=7, preamble=True)
    opening = llm.tokenize("", add_bos=True) + llm.tokenize(PASSKEY_PREAMBLE, add_bos=False)
    assert len(tokens) == len(plain) == 1000 and tokens[: len(opening)] == opening
    text = llm.detokenize(tokens[needle.start : needle.stop]).decode()
    assert text.strip() == "The pass key is 12345. Remember it. 12345 is the pass key."
    assert tokens[len(opening)] == filler[7]  # the haystack follows, from its start
    llm.close()


def test_stream_command_answers(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("Alice lives in Paris. " * 60)  # about 300 tokens: past the 128-token budget
    result = run_json(
        tmp_path,
        "stream",
        "--text",
        str(text),
        "--ask",
        "Where does Alice live?",
        "--every",
        "200",
        "--budget",
        "128",
        "--max-answer-tokens",
        "8",
    )
    assert result["answers"][0]["question"] == "Where does Alice live?"
    assert result["kv"]["evictions"] > 0


def test_demo_runs_short(tmp_path):
    result = run_json(tmp_path, "demo", "--max-tokens", "1050", "--every", "500", "--budget", "256")
    assert len(result["answers"]) == 3  # after 500, 1000 and the last 50 tokens
    assert result["kv"]["n_streamed"] > 1050 and result["kv"]["evictions"] > 0
    assert [f["name"] for f in result["facts"]] == ["red door"]  # the one planted within 1050 tokens
    assert result["kv"]["pages_stored"] > 0  # the demo runs with the recall tier


def test_chat_commands_over_stdin(tmp_path):
    script = "Hello!\n/stats\n/reset\n/stats\n/quit\n"
    out = subprocess.run(
        [sys.executable, "-m", "infmllm_gguf.cli", "chat", "--budget", "128", "--max-tokens", "8"],
        input=script,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # import the installed package, not the source tree
    )
    assert out.returncode == 0, out.stderr
    stats = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert stats[0]["n_streamed"] > 0 and stats[1]["n_streamed"] == 0


def test_chat_in_a_terminal_survives_ctrl_c_and_leaves_on_ctrl_d(tmp_path):
    """A real pseudo-terminal: Ctrl-C during an answer stops it and the conversation goes on;
    Ctrl-C at the prompt abandons the line; Ctrl-D leaves with status 0.  The chat starts with
    SIGINT ignored, as from a background job, whatever this run started with: on a terminal it
    installs its own handler."""
    child = pexpect.spawn(
        sys.executable,
        ["-m", "infmllm_gguf.cli", "chat", "--budget", "256", "--max-tokens", "120"],
        cwd=str(tmp_path),  # import the installed package, not the source tree
        encoding="utf-8",
        timeout=180,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        child.expect_exact("> ")
        child.sendline("Write a very long story about a dragon and a king, with many chapters.")
        child.expect_exact("chapters.\r\n")  # the terminal's echo of the line
        child.expect(r"\w+ \w+ \w+")  # the answer is streaming
        child.sendintr()
        child.expect_exact("[stopped]")
        child.expect_exact("> ")
        child.sendline("/stats")
        child.expect(r"\{.*\}")
        stats = json.loads(child.after)
        assert stats["n_streamed"] > 20 and stats["n_cached"] == stats["n_streamed"]
        child.sendintr()  # at the prompt
        child.expect_exact("^C (Ctrl-D or /quit leaves)")
        child.sendline("Say hello.")
        child.expect_exact("hello.\r\n")
        child.expect(r"\w+")
        child.expect_exact("> ")
        child.sendline("/stats")
        child.expect(r"\{.*\}")
        assert json.loads(child.after)["n_streamed"] > stats["n_streamed"]  # the conversation went on
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


def test_stream_video_answers_at_intervals(tmp_path, codebook_mmproj):
    from infmllm_gguf.codebook import render_words
    from infmllm_gguf.video import write_video

    video = tmp_path / "clip.mp4"
    frames = [render_words(f"the code is {i} {i} {i} {i} .", codebook_mmproj) for i in range(4)]
    write_video(video, frames, fps=1)
    result = run_json(
        tmp_path,
        "stream",
        "--mmproj",
        str(codebook_mmproj),
        "--video",
        str(video),
        "--ask",
        "What is the code?",
        "--every",
        "2",
        "--budget",
        "64",
        "--max-answer-tokens",
        "8",
    )
    assert result["video"]["frames"] == 4 and [round(a["time"]) for a in result["answers"]] == [1, 3]
    assert result["kv"]["images"] == 4 and result["kv"]["evictions"] > 0


def test_chat_attaches_an_image_to_the_next_message(tmp_path, codebook_mmproj):
    from infmllm_gguf.codebook import render_words

    picture = tmp_path / "note.png"
    render_words("the vault code is 4 7 2 1 .", codebook_mmproj).save(picture)
    script = f"/image {tmp_path / 'missing.png'}\n/image {picture}\nRead the note.\n/stats\n/quit\n"
    out = subprocess.run(
        [sys.executable, "-m", "infmllm_gguf.cli", "chat", "--mmproj", str(codebook_mmproj)]
        + ["--max-tokens", "8"],
        input=script,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "no such file" in out.stdout and "image attached: note.png" in out.stdout
    stats = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert stats[0]["images"] == 1 and stats[0]["n_image_cells"] == 16


def test_cli_unknown_policy_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["ppl", "--policy", "lru"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'lru'" in capsys.readouterr().err


def test_cli_bad_budget_exits_with_a_clear_error(capsys):
    assert main(["ppl", "--policy", "streamingllm", "--budget", "2"]) == 2
    assert "budget (2) must be >= sinks (4)" in capsys.readouterr().err
    assert main(["ppl", "--recall", "--recall-every", "8"]) == 2
    assert 'every sets how often chunk mode recalls: when="chunk" only' in capsys.readouterr().err
