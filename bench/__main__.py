"""The benchmarks, one subcommand each: `python -m bench NAME [options]`, from the repository root.

`python -m bench NAME --help` says what NAME measures, its options and the files it writes.
Configurations (a policy and the recall tier's settings) are named in bench/configs.py.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand: the module of bench/ that registers its arguments and runs it
BENCHMARKS = {
    "ppl": "ppl",
    "passkey": "passkey",
    "recall": "recall",
    "recall-facts": "recall_facts",
    "recall-rules": "recall_rules",
    "recall-selection": "recall_selection",
    "multiround": "multiround",
    "video": "video",
    "speed": "speed",
    "native": "native",
    "batching": "batching",
    "server": "server",
    "peer": "peer",
    "gpu": "gpu",
    "soak": "soak",
    "long-chat": "long_chat",
    "sweep-infmllm": "sweep_infmllm",
    "sweep-video": "sweep_video",
    "builds": "builds",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="NAME")
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(f"bench.{module_name}")
        p = sub.add_parser(
            name,
            help=module.__doc__.splitlines()[0],
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
