"""A long-lived process that forks one training child per trial; the test SIGKILLs the child at a random moment.

Run as ``python tests/_checkpoint_kill_worker.py WORLD_SIZE RANK CHECKPOINT_DIR``. The imports (seconds on a loaded
machine) happen once here; each trial is a ``fork`` that resumes with ``ckpt_path="last"`` and saves every step
(``ModelCheckpoint(save_last=True)`` plus the two newest by step) until it is killed. With ``WORLD_SIZE`` 2, one such
process per rank, and the children train with :class:`FSDP2Strategy` on gloo.

Protocol: the test writes ``trial <port>`` (or ``quit``) to stdin; this process answers ``child <pid>`` and, once the
child is gone, ``exit <status>``. Rank zero's child writes to the same stdout: ``bad <file> <error>`` for a checkpoint
under its real name that does not load, ``leftovers <n>`` (staging or partial files of a killed save, before this
trial cleaned them), ``resumed <step>``, ``clean <bool>`` (no staging leftovers once the strategy is set up),
``saving <step>`` when a save starts and ``saved <step>`` once it has returned. The children never exit on their own:
they are killed (so the gloo exit abort that ``tests/_worker_exit.py`` guards against cannot happen here).
``KILL_WORKER_IO=lightning`` saves with Lightning's own ``TorchCheckpointIO`` instead, to see what the kills catch.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_precision import FSDP2Strategy, resolve_trainer_cfg

WIDTH, LAYERS = 384, 6  # ~0.9M parameters: with AdamW state a checkpoint is ~11 MB, so a save takes a while
STAGING = re.compile(r"^\..+\.(incomplete|complete|replaced|[0-9a-f]{8}\.partial)$")


class Wide(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.net(batch[0]).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


class Report(Callback):
    """Rank zero tells the test where training resumed and when each save starts and returns."""

    def __init__(self, say: Any, directory: Path) -> None:
        self.say, self.directory = say, directory

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.say(f"resumed {trainer.global_step}")
        found = self.directory.iterdir() if self.directory.is_dir() else ()
        self.say(f"clean {not any(STAGING.match(p.name) for p in found)}")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: Any) -> None:
        self.say(f"saving {trainer.global_step}")

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.say(f"saved {trainer.global_step}")  # the save at the end of the previous batch has returned


def check_checkpoints(directory: Path, say: Any) -> None:
    """Every checkpoint under a real name loads; count what killed saves left under staging names."""
    if not directory.is_dir():
        return
    for path in sorted(directory.glob("*.ckpt")):
        try:
            torch.load(path / "meta.pt" if path.is_dir() else path, weights_only=True)
            if path.is_dir() and not (path / ".metadata").is_file():
                raise FileNotFoundError(".metadata")
        except Exception as error:  # reported to the test, which fails naming it
            say(f"bad {path.name} {type(error).__name__}:{error}".replace("\n", " "))
    say(f"leftovers {sum(bool(STAGING.match(p.name)) for p in directory.iterdir())}")


def train(world_size: int, rank: int, directory: Path, port: int, say: Any) -> None:
    torch.set_num_threads(1)
    if world_size > 1:
        os.environ.update(
            RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0", WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
            TORCHELASTIC_RUN_ID=f"kill-{port}",
        )  # fmt: skip
    if rank == 0:
        check_checkpoints(directory, say)
    checkpoints = ModelCheckpoint(
        dirpath=directory, save_last=True, every_n_train_steps=1, monitor="step", mode="max", save_top_k=2
    )
    cfg = {
        "accelerator": "cpu",
        "devices": world_size,
        "max_steps": 1_000_000,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": [checkpoints, Report(say if rank == 0 else lambda line: None, directory)],
        "default_root_dir": str(directory.parent),
    }
    if world_size > 1:
        cfg["strategy"] = FSDP2Strategy()
    if os.environ.get("KILL_WORKER_IO") == "lightning":  # Lightning's own saver, to show what the kills catch
        cfg["plugins"] = [TorchCheckpointIO()]
    data = DataLoader(TensorDataset(torch.randn(64, WIDTH)), batch_size=8)
    pl.Trainer(**resolve_trainer_cfg(cfg)).fit(Wide(), data, ckpt_path="last")
    say("finished")  # never expected: the test kills the child first


def main() -> None:
    world_size, rank, directory = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    proto = os.dup(1)

    def say(line: str) -> None:
        os.write(proto, f"{line}\n".encode())

    for command in sys.stdin:
        if command.strip() == "quit":
            return
        port = int(command.split()[1])
        pid = os.fork()
        if pid == 0:
            os.dup2(2, 1)  # Lightning's prints go to stderr; stdout carries the protocol only
            try:
                train(world_size, rank, directory, port, say)
            except BaseException as error:
                traceback.print_exc()
                say(f"error {type(error).__name__}:{error}".replace("\n", " "))
            finally:
                os._exit(1)
        say(f"child {pid}")
        _, status = os.waitpid(pid, 0)
        say(f"exit {status}")


if __name__ == "__main__":
    main()
