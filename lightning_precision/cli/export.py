"""``lightning-precision export``: a checkpoint's weights as safetensors (see :mod:`lightning_precision.export`)."""

from __future__ import annotations

import argparse

from lightning_precision.export import DEFAULT_MAX_SHARD_SIZE, EXPORT_DTYPES, KEEP_FP32_CHOICES


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``export`` subcommand to the command's subparsers."""
    export = sub.add_parser(
        "export",
        help="write a checkpoint's weights as safetensors (p + compensation, rounded once)",
        description="Write the weights of a Lightning checkpoint (file or FSDP2 distributed checkpoint directory) as "
        "model.safetensors, each weight from the most exact value the checkpoint holds.",
    )
    export.add_argument("checkpoint", help="a .ckpt file, or a distributed checkpoint directory")
    export.add_argument("output_dir", help="where model.safetensors (or its shards and index) go")
    export.add_argument(
        "--dtype", default="bf16", help=f"dtype of the exported weights: {', '.join(EXPORT_DTYPES)} (default: bf16)"
    )
    export.add_argument(
        "--strip-prefix", default=None, metavar="PREFIX", help="remove PREFIX from names, e.g. 'model.' for HF models"
    )
    export.add_argument(
        "--keep-fp32",
        default="auto",
        help=f"{' or '.join(KEEP_FP32_CHOICES)}: keep what the run kept in fp32 (auto, default) or cast all",
    )
    export.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        metavar="SIZE",
        help=f"largest file before sharding, e.g. 500MB (default: {DEFAULT_MAX_SHARD_SIZE})",
    )


def run(args: argparse.Namespace) -> int:
    """Export, print the table and return the exit code (errors propagate to the command's handler)."""
    from lightning_precision.export import export_weights

    result = export_weights(
        args.checkpoint,
        args.output_dir,
        dtype=args.dtype,
        strip_prefix=args.strip_prefix,
        keep_fp32=args.keep_fp32,
        max_shard_size=args.max_shard_size,
    )
    print(result.format_table())
    return 0
