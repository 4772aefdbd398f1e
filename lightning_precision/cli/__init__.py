"""The ``lightning-precision`` command: ``explain``, ``train``, ``compare``, ``export`` and ``docs``.

Each subcommand lives in its own module of this package (:mod:`~lightning_precision.cli.explain`,
:mod:`~lightning_precision.cli.train`, :mod:`~lightning_precision.cli.compare`, :mod:`~lightning_precision.cli.docs`),
imported when that subcommand runs.

Exit codes, like a linter's: 0 success (or a safe config), 1 an unsafe verdict (``explain``: whatever ``on_unsafe``
says, unless it is ``ignore``, an accepted risk; ``--exit-zero`` only reports), ``train`` refusing an unsafe pairing
under ``on_unsafe: error``, or a recipe that crashed; 2 bad input (missing file, YAML that does not parse, unknown
override key, unknown precision, a bad ``--params``/``--devices``/docs topic, any
:class:`~lightning_precision.errors.PrecisionConfigError`). Errors are one line on stderr, without a traceback;
``--debug`` (before or after the subcommand) shows the full traceback, with the error a config error wraps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path

from lightning_precision.errors import PrecisionConfigError, PrecisionPairingError

EXIT_OK, EXIT_UNSAFE, EXIT_BAD_INPUT = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="lightning-precision",
        description="What your precision config does to parameters and optimizer state, and whether it matters.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{explain,train,compare,export,docs}")

    explain = sub.add_parser(
        "explain",
        help="print the precision contract of a config and its memory per device, without training",
        description="Exit status: 0 safe, 1 unsafe (unless on_unsafe is ignore; see --exit-zero), 2 bad input.",
    )
    _add_config_args(explain)
    explain.add_argument("--json", action="store_true", help="print the contract as JSON")
    explain.add_argument(
        "--params",
        metavar="N",
        help="trainable parameters of the model (7B, 1.5B, 125M or an integer), for GiB per device; the model the "
        "config names is never built to count them",
    )
    explain.add_argument(
        "--devices", type=int, default=1, metavar="N", help="devices the run uses (default 1); FSDP2 shards over them"
    )
    explain.add_argument("--exit-zero", action="store_true", help="only report: exit 0 even when the verdict is unsafe")

    train = sub.add_parser("train", help="train the built-in task with a config")
    _add_config_args(train)
    train.add_argument("--output-dir", default="runs", help="where CSV logs and checkpoints go (default: runs/)")
    train.add_argument("--ckpt-every", type=int, default=None, metavar="N", help="save a checkpoint every N steps")

    from lightning_precision.cli.compare import DEFAULT_RECIPES, RECIPES  # cheap: no training imports at module level

    compare = sub.add_parser("compare", help="train the built-in task under several recipes and compare them")
    compare.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per recipe (default: the built-in task's)"
    )
    compare.add_argument(
        "--recipes",
        nargs="+",
        default=list(DEFAULT_RECIPES),
        choices=list(RECIPES),
        metavar="RECIPE",
        help=f"recipes to run (default: all). Choices: {', '.join(RECIPES)}",
    )
    compare.add_argument("--seed", type=int, default=0, help="seed of data, data order and initial weights")
    compare.add_argument("--output-dir", default="runs/compare", help="where the plot and results go")
    compare.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: 1, fastest for the tiny task)"
    )
    from lightning_precision.cli.export import add_parser as add_export  # cheap: no checkpoint reading at import

    add_export(sub)
    from lightning_precision.cli.docs import add_parser as add_docs  # cheap: reads no file at import

    add_docs(sub)
    debug_help = "on an error, show the full traceback instead of the one-line message"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    for command in sub.choices.values():  # also after the subcommand; SUPPRESS keeps a --debug given before it
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    return parser


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run config (see configs/)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override a config value, e.g. trainer.max_steps=10 (prefix + to add a key)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit code (also used by the console script).
    """
    args = build_parser().parse_args(argv)
    try:
        if args.command == "explain":
            return _explain(args)
        if args.command == "train":
            return _train(args)
        if args.command == "export":
            from lightning_precision.cli.export import run as export

            return export(args)
        if args.command == "docs":
            from lightning_precision.cli.docs import run as docs

            return docs(args)
        return _compare(args)
    except PrecisionPairingError as err:
        _report(err, args.debug)
        return EXIT_UNSAFE
    except PrecisionConfigError as err:
        _report(err, args.debug)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # output piped into `head` and the like: not an error of ours
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter's final flush quiet
        return EXIT_OK


def _report(err: Exception, debug: bool) -> None:
    if debug:  # the whole chain: a constructor's own error is the cause of the config error that names it
        traceback.print_exception(err, file=sys.stderr)
    else:
        _error(str(err))


def _error(message: str) -> None:
    # One line: the reader sees the cause at once, and scripts can grep it.
    print(f"lightning-precision: error: {' '.join(message.split())}", file=sys.stderr)


def _explain(args: argparse.Namespace) -> int:
    from lightning_precision.cli.explain import explain
    from lightning_precision.cli.explain_memory import check_devices, parse_params
    from lightning_precision.cli.yaml_loading import load_config, load_layout

    params = parse_params(args.params) if args.params is not None else None  # bad input before reading the file
    devices = check_devices(args.devices)
    cfg = load_config(args.config, args.overrides)
    layout = load_layout(cfg, source=str(args.config))
    result = explain(
        layout.trainer,
        layout.model,
        layout.optimizer,
        source=str(args.config),
        notes=layout.notes,
        params=params,
        devices=devices,
    )
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.format_text())
    if not result.fails or args.exit_zero:
        return EXIT_OK
    # A linter's finding: the table above says why; this line says what to do about the exit status.
    _error(
        result.error
        or f"{args.config}: unsafe pairing (on_unsafe={result.on_unsafe}); fix it as shown, set on_unsafe: ignore "
        "to accept the risk, or pass --exit-zero to only report"
    )
    return EXIT_UNSAFE


def _train(args: argparse.Namespace) -> int:
    from lightning_precision.cli.train import print_summary, train_from_config
    from lightning_precision.cli.yaml_loading import load_config, load_layout, require_trainer_section

    cfg = load_config(args.config, args.overrides)
    # logs the notes on sections the run does not read; a LitGPT layout has no trainer to build
    require_trainer_section(load_layout(cfg, source=str(args.config)), source=str(args.config))
    output_dir = writable_directory(args.output_dir, what="--output-dir")
    result = train_from_config(cfg, output_dir=output_dir, name=Path(args.config).stem, ckpt_every=args.ckpt_every)
    print_summary(result)
    return EXIT_OK


def _compare(args: argparse.Namespace) -> int:
    from lightning_precision.cli.compare import run_compare

    output_dir = writable_directory(args.output_dir, what="--output-dir")  # before the recipes train, not after
    report = run_compare(recipes=args.recipes, steps=args.steps, seed=args.seed, output_dir=output_dir, threads=args.threads)
    print(report.format_text())
    return EXIT_OK if report.ok else EXIT_UNSAFE


def writable_directory(path: str | Path, *, what: str) -> Path:
    """Create the directory if missing and check that a file can be written in it, before any work is done.

    Raises:
        PrecisionConfigError: If ``path`` or a parent of it is a file, or the directory cannot be created or written.
    """
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        reason = "it or a parent of it is a file" if isinstance(err, (FileExistsError, NotADirectoryError)) else None
        raise PrecisionConfigError(
            f"{what} {str(path)!r} is not a writable directory ({reason or err.strerror or err})."
        ) from err
    return directory
