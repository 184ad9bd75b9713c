"""`infmllm-gguf` command line: demo, chat, stream (text or video), ppl, passkey, serve."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from infmllm_gguf.evaluate import ask_facts, plant_facts, run_passkey, run_ppl, stream_and_ask
from infmllm_gguf.llama import Llama
from infmllm_gguf.policies import POLICIES, make_policy
from infmllm_gguf.recall import Recall
from infmllm_gguf.system import current_rss_mb, peak_rss_mb
from infmllm_gguf.texts import kjv, load_text
from infmllm_gguf.video import time_marker


def _read_text(path: str | None) -> str:
    if path is None:
        return kjv()
    if path == "-":
        return sys.stdin.read()
    return load_text(path)


def _recall(args: argparse.Namespace) -> Recall | None:
    """The recall tier the --recall flags ask for (None with --no-recall)."""
    if not args.recall:
        return None
    return Recall(
        when=args.recall_when,
        reencode=args.recall_reencode,
        adjacent=args.recall_adjacent,
        score=args.recall_score,
        every=args.recall_every,
    )


def _make_llama(args: argparse.Namespace) -> Llama:
    n_ctx = args.n_ctx or (args.budget + max(16, args.budget // 8) if args.policy != "full" else 2048)
    policy = make_policy(args.policy, budget=args.budget, reposition=args.reposition)
    return Llama(
        args.model,
        n_ctx=n_ctx,
        kv_policy=policy,
        flash_attn=args.flash_attn,
        seed=0,
        mmproj_path=args.mmproj,
        recall=_recall(args),
    )


def _emit(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if getattr(args, "json", None):
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


# --- ppl ---------------------------------------------------------------------------


def cmd_ppl(args: argparse.Namespace) -> int:
    llm = _make_llama(args)
    tokens = np.array(llm.tokenize(_read_text(args.text), add_bos=True), np.int32)[: args.max_tokens]
    result = {
        "policy": llm.policy.name,
        "budget": args.budget,
        "reposition": llm.policy.reposition,
        **run_ppl(llm, tokens, desc=f"ppl {llm.policy.name}"),
    }
    print(
        f"{result['policy']} budget={args.budget}: ppl={result['ppl']:.3f} over {result['n_tokens']} tokens, "
        f"{result['tokens_per_s']:.0f} tok/s, peak RSS {result['peak_rss_mb']:.0f} MB"
    )
    _emit(args, result)
    return 0


# --- passkey -------------------------------------------------------------------------


def cmd_passkey(args: argparse.Namespace) -> int:
    llm = _make_llama(args)
    result = {
        "policy": llm.policy.name,
        "budget": args.budget,
        "length": args.length,
        **run_passkey(llm, args.length, args.depths, args.trials),
    }
    print(f"{result['policy']} budget={args.budget} length={args.length}: accuracy {result['accuracy']:.2f}")
    _emit(args, result)
    return 0


# --- stream / demo -------------------------------------------------------------------


# not a chat answer, comes right before the pass-key questions (the model copies a fresh answer)
DEMO_QUESTIONS = [
    "Who created the heaven and the earth?",
    "What did God call the light?",
    "Who was the first man?",
    "Who built the ark?",
    "Who was the father of Isaac?",
    "Who was sold into Egypt by his brothers?",
    "What is the name of Abraham's wife?",
]


# pass-key style facts planted early in the demo's text (character offset, name, code): the
# 135M model copies a code from its context well in completion form
DEMO_FACTS = [(4_000, "red door", "48213"), (12_000, "old well", "90574"), (20_000, "east tower", "31862")]
# the demo's text opens as a passkey test does: the model is told that keys will be asked for
DEMO_PREAMBLE = (
    "There are pass keys hidden inside a lot of irrelevant text. Find them and memorize them. "
    "I will quiz you about them at the end.\n\n"
)


def cmd_demo(args: argparse.Namespace) -> int:
    llm = _make_llama(args)
    text, planted = plant_facts(_read_text(args.text)[: args.max_tokens * 8], DEMO_FACTS)
    text = DEMO_PREAMBLE + text
    print(f"infmllm-gguf demo: {llm.model_path.name}, policy {llm.policy!r}, n_ctx {llm.n_ctx()}")
    print(f"recall tier: {llm.recall!r}" if llm.recall else "recall tier: off (--recall brings it in)")
    print(
        f"streaming about {args.max_tokens} tokens of text through a {llm.policy.budget}-token cache, "
        f"asking a question every {args.every} tokens; {len(planted)} pass keys are planted early "
        "and asked for at the end\n"
    )
    start = time.perf_counter()
    answers = stream_and_ask(llm, text, DEMO_QUESTIONS, args.every, 24, args.max_tokens)
    print(f"\nat token {llm.n_streamed}, long after they left the {llm.policy.budget}-token cache:")
    facts = ask_facts(llm, planted)
    stats = llm.kv_stats()
    elapsed = time.perf_counter() - start
    print(
        f"\ndone: {stats['n_streamed']} tokens streamed in {elapsed:.0f} s "
        f"({stats['n_streamed'] / elapsed:.0f} tok/s), cache never above {stats['capacity']} cells "
        f"(max position {stats['max_pos_seen']} < n_ctx {llm.n_ctx()}), {stats['n_evicted']} tokens evicted "
        f"in {stats['evictions']} rounds, peak RSS {peak_rss_mb():.0f} MB"
    )
    if llm.recall:
        print(
            f"recall: {stats['pages_stored']} pages in host memory ({stats['store_mb']:.0f} MB), "
            f"{stats['recalls']} recalls; {sum(f['correct'] for f in facts)} of {len(facts)} pass keys found "
            "(run with --no-recall to see them lost)"
        )
    result = {
        "answers": answers,
        "facts": facts,
        "kv": stats,
        "seconds": elapsed,
        "peak_rss_mb": peak_rss_mb(),
    }
    _emit(args, result)
    return 0


def cmd_stream(args: argparse.Namespace) -> int:
    llm = _make_llama(args)
    if args.video is not None:
        return _stream_video(llm, args)
    every = args.every or 2_000
    answers = stream_and_ask(llm, _read_text(args.text), args.ask, every, args.max_answer_tokens)
    _emit(args, {"answers": answers, "kv": llm.kv_stats(), "peak_rss_mb": peak_rss_mb()})
    return 0


def _stream_video(llm: Llama, args: argparse.Namespace) -> int:
    """Feed a video frame by frame, asking the questions in turn every `--every` frames."""
    answers: list[dict] = []

    def on_frame(info: dict[str, Any]) -> None:
        if not args.ask or info["frame"] % (args.every or 60):
            return
        question = args.ask[len(answers) % len(args.ask)]
        answer = llm.ask(question, max_tokens=args.max_answer_tokens)
        stats = llm.kv_stats()
        tqdm.write(
            f"[{time_marker(info['time'])} frame {info['frame']}"
            f" | cache {stats['n_cached']}/{stats['capacity']} | {stats['evictions']} evictions"
            f" | {info['seconds_per_frame']:.2f} s/frame"
            f" | RSS {current_rss_mb():.0f} MB]\n  Q: {question}\n  A: {answer}"
        )
        answers.append({"time": info["time"], "question": question, "answer": answer, "kv": stats})

    stats = llm.feed_video(args.video, fps=args.fps, on_frame=on_frame)
    print(
        f"done: {stats['frames']} frames ({time_marker(stats['video_seconds'])} of video) in "
        f"{stats['seconds']:.0f} s, {stats['seconds_per_frame']:.2f} s/frame, "
        f"{stats['evictions']} evictions, cache {llm.n_cached} cells, peak RSS {peak_rss_mb():.0f} MB"
    )
    _emit(args, {"video": stats, "answers": answers, "kv": llm.kv_stats(), "peak_rss_mb": peak_rss_mb()})
    return 0


# --- chat -----------------------------------------------------------------------------


def _prompts() -> Iterator[str]:
    """Lines typed at the prompt; Ctrl-C abandons the line, Ctrl-D ends the chat."""
    if not sys.stdin.isatty():
        yield from sys.stdin
        return
    while True:
        try:
            yield input("> ")
        except KeyboardInterrupt:
            print("^C (Ctrl-D or /quit leaves)")
        except EOFError:
            print()
            return


def cmd_chat(args: argparse.Namespace) -> int:
    if sys.stdin.isatty():  # Ctrl-C stops answers also when started with SIGINT ignored (`cmd &`)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    llm = _make_llama(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print(
        "infmllm-gguf chat: /stats, /reset, /quit"
        + (", /image PATH (attached to your next message)" if args.mmproj else "")
        + "; Ctrl-C stops an answer, Ctrl-D leaves. The cache policy handles history; nothing is truncated."
    )
    images: list[dict] = []
    for line in _prompts():
        line = line.strip()
        if not line:
            continue
        if line == "/quit":
            break
        if line.startswith("/image"):
            path = Path(line[len("/image") :].strip()).expanduser()
            if not args.mmproj:
                print("(images need --mmproj)")
            elif not path.is_file():
                print(f"(no such file: {path})")
            else:
                images.append({"type": "image_url", "image_url": {"url": str(path)}})
                print(f"(image attached: {path.name})")
            continue
        if line == "/stats":
            print(json.dumps(llm.kv_stats()))
            continue
        if line == "/reset":
            llm.reset()
            messages = messages[:1] if args.system else []
            print("(reset)")
            continue
        content: str | list[dict] = [*images, {"type": "text", "text": line}] if images else line
        images = []
        messages.append({"role": "user", "content": content})
        reply = ""
        try:
            for chunk in llm.create_chat_completion(
                messages, max_tokens=args.max_tokens, stream=True, temperature=0.2
            ):
                piece = chunk["choices"][0]["delta"].get("content", "")
                reply += piece
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print(" [stopped]", end="")  # the session keeps what was said, the partial answer too
        except (ValueError, FileNotFoundError) as exc:  # e.g. an unreadable image: the session goes on
            print(f"(error: {exc})", end="")
        print()
        if reply:
            messages.append({"role": "assistant", "content": reply})
        else:
            messages.pop()  # stopped before a word: the turn never happened
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from infmllm_gguf.server import Access, Limits, ServerConfig, serve

    keys = list(args.api_key)
    if args.api_key_file:
        keys += [line.strip() for line in Path(args.api_key_file).read_text().splitlines() if line.strip()]
    if args.media_path is not None and not Path(args.media_path).is_dir():
        raise ValueError(f"--media-path {args.media_path} is not a directory")
    access = Access(
        api_keys=tuple(keys),
        allowed_hosts=tuple(h.strip() for h in args.allowed_hosts.split(",")) if args.allowed_hosts
        else Access.allowed_hosts,
        media_path=Path(args.media_path) if args.media_path else None,
        metrics=args.metrics, strict_model_name=args.strict_model_name, insecure=args.insecure,
    )  # fmt: skip
    limits = Limits(
        max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens, max_images=args.max_images,
        max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
        max_body_bytes=args.max_body_bytes, timeout=args.timeout, max_sessions=args.max_sessions,
        max_session_bytes=args.max_session_bytes,
    )  # fmt: skip
    config = ServerConfig(
        model=args.model, mmproj=args.mmproj, kv_policy=args.policy, budget=args.budget, n_ctx=args.n_ctx,
        reposition=args.reposition, flash_attn=args.flash_attn,
        slots=args.slots, sessions_dir=args.sessions_dir, max_queue=args.max_queue,
        model_alias=args.model_alias, recall=_recall(args), n_threads=args.threads,
        limits=limits, access=access,
    )  # fmt: skip
    serve(config, args.host, args.port)
    return 0


# --- parser ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infmllm-gguf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(
        p: argparse.ArgumentParser, budget: int = 512, policy: str = "infmllm", recall: bool = False
    ) -> None:
        p.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2-135M)")
        p.add_argument("--policy", "--kv-policy", dest="policy", default=policy, choices=list(POLICIES))
        p.add_argument("--budget", type=int, default=budget, help="KV-cache budget in tokens")
        p.add_argument("--n-ctx", type=int, default=None, help="context cells (default: budget + chunk)")
        p.add_argument("--flash-attn", action="store_true")
        p.add_argument(
            "--reposition",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="compact kept tokens to positions 0..n-1 after each eviction (--no-reposition: keep "
            "their positions; needed for M-RoPE models)",
        )
        p.add_argument("--mmproj", default=None, help="a projector (mmproj GGUF) for images and video")
        p.add_argument("--json", default=None, help="write machine-readable results here")
        p.add_argument(
            "--recall",
            action=argparse.BooleanOptionalAction,
            default=recall,
            help="keep evicted pages in host memory and bring back the ones a question needs",
        )
        p.add_argument(
            "--recall-when",
            default="turn",
            choices=Recall.WHEN,
            help="recall once per question (turn) or also after every eviction (chunk)",
        )
        p.add_argument(
            "--recall-every",
            type=int,
            default=None,
            metavar="N",
            help="chunk mode: also recall every N tokens fed between evictions",
        )
        p.add_argument(
            "--recall-reencode",
            action="store_true",
            help="after a turn's recall, decode the cached text from the recalled pages on again",
        )
        p.add_argument(
            "--recall-adjacent",
            action="store_true",
            help="a recalled page brings the adjacent pages that score above the median (whole facts)",
        )
        p.add_argument(
            "--recall-score",
            default="peak",
            choices=Recall.SCORES,
            help="rank pages by the question's strongest head (peak), by the share of attention a "
            "full cache would give them (attention: reads every stored key), take each's best in "
            "turn (both), or by where the new text's words were said before (text: no queries; in "
            "chunk mode the text about to be read)",
        )

    p = sub.add_parser("demo", help="stream a long text through a small cache, asking questions")
    common(p, recall=True)
    p.add_argument("--text", default=None, help="a file, or kjv / genesis / jargon (default: kjv)")
    p.add_argument("--max-tokens", type=int, default=20_000)
    p.add_argument("--every", type=int, default=2_500)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("chat", help="interactive long-session chat")
    common(p, budget=1024)
    p.add_argument("--system", default="You are a helpful assistant.")
    p.add_argument("--max-tokens", type=int, default=256)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "stream", help="feed a text file (or - for stdin) or a video, and ask questions at intervals"
    )
    common(p)
    p.add_argument("--text", default="-")
    p.add_argument("--video", default=None, help="a video file (needs --mmproj), decoded frame by frame")
    p.add_argument("--fps", type=float, default=1.0, help="video frames fed per second of video")
    p.add_argument("--ask", action="append", default=[], help="a question (repeatable)")
    p.add_argument(
        "--every", type=int, default=None, help="tokens (text, default 2000) or frames (video, default 60)"
    )
    p.add_argument("--max-answer-tokens", type=int, default=32)
    p.set_defaults(func=cmd_stream)

    p = sub.add_parser("ppl", help="streaming perplexity per 1k-token bucket")
    common(p)
    p.add_argument("--text", default=None)
    p.add_argument("--max-tokens", type=int, default=10_000)
    p.set_defaults(func=cmd_ppl)

    p = sub.add_parser("serve", help="an OpenAI-compatible server of endless conversations in sequence slots")
    common(p, budget=1024)
    p.add_argument(
        "--slots", type=int, default=8, help="sequence slots: conversations held in the cache at once"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--sessions-dir", default="infmllm-sessions", help="where idle conversations are saved")
    p.add_argument("--max-queue", type=int, default=32, help="requests waiting beyond the slots before 503")
    p.add_argument("--model-alias", default=None, help="the model id clients send (default: the file's stem)")
    p.add_argument("--threads", type=int, default=None)
    g = p.add_argument_group("access")
    g.add_argument("--api-key", action="append", default=[], help="a key clients send as Bearer (repeatable)")
    g.add_argument("--api-key-file", default=None, help="a file of keys, one per line")
    g.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    g.add_argument(
        "--allowed-hosts", default=None,
        help="Host header names answered, comma-separated, * for any (default: localhost, 127.0.0.1, ::1)",
    )  # fmt: skip
    g.add_argument("--media-path", default=None, help="serve local image files from this folder only")
    g.add_argument("--metrics", action="store_true", help="expose Prometheus /metrics")
    g.add_argument("--strict-model-name", action="store_true", help="404 for a request naming another model")
    from infmllm_gguf.server.config import Limits

    limits = Limits()
    g = p.add_argument_group("limits (per request unless said)")
    for flag, kind, help_ in (
        ("--max-tokens", int, "generated tokens (more asked: 400)"),
        ("--max-prompt-tokens", int, "tokens the prompt renders to"),
        ("--max-images", int, "images"),
        ("--max-image-bytes", int, "bytes of one encoded image"),
        ("--max-image-pixels", int, "width x height of one image, from its header"),
        ("--max-body-bytes", int, "bytes of the request body (413)"),
        ("--timeout", float, "seconds, waiting included; generation past it ends as 'length'"),
        ("--max-sessions", int, "conversations kept in slots and on disk (least recently used removed)"),
        ("--max-session-bytes", int, "bytes of session files on disk (least recently used removed)"),
    ):
        name = flag[2:].replace("-", "_")
        g.add_argument(flag, type=kind, default=getattr(limits, name), help=f"{help_} (default %(default)s)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("passkey", help="passkey retrieval at several depths")
    common(p)
    p.add_argument("--length", type=int, default=2_048)
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--trials", type=int, default=3)
    p.set_defaults(func=cmd_passkey)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"infmllm-gguf: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
