"""Command line for the data tools: `python -m ultramem.data prepare INPUT... --out DIR`."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap

from .documents import JSONL_SUFFIXES, TEXT_SUFFIXES
from .pipeline import DEFAULT_VOCAB, default_workers, prepare
from .shards import DEFAULT_SHARD_TOKENS


def _positive(value: str) -> int:
    n = int(value.replace("_", ""))
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return n


def _non_negative(value: str) -> int:
    n = int(value.replace("_", ""))
    if n < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ultramem.data", description="ultramem data tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "prepare",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="tokenize text into a directory of .npy token shards for training (data.source = DIR)",
        description=(
            "Tokenize text files, directories and JSON Lines into DIR: flat 1-D token shards\n"
            "tokens-00000.npy, ... (uint16, or uint32 for vocabularies over 65536; each document is\n"
            "followed by the tokenizer's end-of-text id), tokenizer.json and meta.json. Point the\n"
            "trainer's data.source at DIR. The output appears only when everything is written: an\n"
            "interrupted or failed run (Ctrl-C included) leaves DIR as it was.\n\n"
            "Inputs: a file is always read; a directory is walked recursively (sorted, hidden entries\n"
            "skipped) for files with these suffixes (optionally .gz compressed):\n"
            + textwrap.fill(" ".join(sorted(TEXT_SUFFIXES)), 90, initial_indent="  ", subsequent_indent="  ")
            + "\n"
            f"Files ending in {' / '.join(sorted(JSONL_SUFFIXES))} hold one JSON object per line with a\n"
            '"text" string (one document per line); every other file is one document. Invalid UTF-8\n'
            "is replaced with U+FFFD, with a warning naming the file. Empty documents are skipped."
        ),
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="text files, directories or JSON Lines files")
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output directory (created if needed; an earlier prepare's output there is replaced)",
    )
    p.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="a Hugging Face tokenizers JSON file, or a directory holding tokenizer.json; without it "
        "a byte-level BPE is trained on the inputs (copied to DIR/tokenizer.json either way)",
    )
    p.add_argument(
        "--vocab-size",
        type=_positive,
        default=None,
        metavar="N",
        help=f"vocabulary of the BPE trained when no --tokenizer is given (default {DEFAULT_VOCAB})",
    )
    p.add_argument(
        "--train-chars",
        type=_non_negative,
        default=0,
        metavar="N",
        help="train that BPE on the first N characters of the inputs only (default 0: all of them)",
    )
    p.add_argument(
        "--workers",
        type=_positive,
        default=default_workers(),
        metavar="N",
        help="tokenizer processes (default min(CPUs, 8) = %(default)s); the output does not depend on it",
    )
    p.add_argument(
        "--shard-tokens",
        type=_positive,
        default=DEFAULT_SHARD_TOKENS,
        metavar="N",
        help=f"tokens per shard, the last one shorter (default {DEFAULT_SHARD_TOKENS:_})",
    )
    p.add_argument(
        "--eos",
        metavar="TOKEN_OR_ID",
        help="the token (or id) appended after every document (default: the tokenizer's end-of-text "
        "token, the first of <|endoftext|>, <|end_of_text|>, </s>, <eos>, <|eos|> it has)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (drawn only on a terminal)")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.tokenizer is not None and args.vocab_size is not None:
        build_parser().error("--vocab-size sizes a tokenizer trained here; --tokenizer brings its own vocabulary")
    try:
        meta = prepare(
            args.inputs,
            args.out,
            tokenizer=args.tokenizer,
            vocab_size=DEFAULT_VOCAB if args.vocab_size is None else args.vocab_size,
            workers=args.workers,
            shard_tokens=args.shard_tokens,
            eos=args.eos,
            train_chars=args.train_chars,
            progress=not (args.no_progress or args.quiet) and sys.stderr.isatty(),
        )
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"{args.out}: {meta['n_tokens']} tokens in {len(meta['shards'])} shard(s), vocab_size={meta['vocab_size']}, "
        f"eos_id={meta['eos_id']}, {meta['n_documents']} documents"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
