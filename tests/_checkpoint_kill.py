"""The test side of the SIGKILL runs: start one long-lived ``_checkpoint_kill_worker.py`` per rank, and for each trial
let it fork a training child, check where the child resumed, then SIGKILL it at a random moment (seeded)."""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.strategies._launch import free_port

WORKER = Path(__file__).with_name("_checkpoint_kill_worker.py")
REPO = Path(__file__).resolve().parents[1]
RESUME_TIMEOUT_S = 120.0


class KillRunFailed(AssertionError):
    """A resume after a kill did not find the last complete checkpoint, or a child failed."""


@dataclass
class KillRun:
    """What a run of kills gave."""

    kills: int = 0
    mid_save: int = 0  # kills after which staging or partial files were found: the kill landed inside a save
    resumed: list[int] = field(default_factory=list)
    seconds: float = 0.0


class _Zygote:
    def __init__(self, world_size: int, rank: int, directory: Path, log: Path, env: dict[str, str]) -> None:
        self.log = log
        with log.open("wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, str(WORKER), str(world_size), str(rank), str(directory)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=env, cwd=REPO,
            )  # fmt: skip
        self.pending = b""

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{line}\n".encode())
        self.proc.stdin.flush()

    def line(self, timeout: float = RESUME_TIMEOUT_S) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise KillRunFailed(f"no answer from the worker within {timeout:.0f}s\n{self.tail()}")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise KillRunFailed(f"the worker ended (exit {self.proc.wait()})\n{self.tail()}")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        text = line.decode()
        if text.startswith(("error", "bad", "finished")):
            raise KillRunFailed(f"{text}\n{self.tail()}")
        return text

    def expect(self, word: str) -> str:
        text = self.line()
        if not text.startswith(word):
            raise KillRunFailed(f"expected {word!r}, got {text!r}\n{self.tail()}")
        return text.split(maxsplit=1)[1]

    def tail(self) -> str:
        return "--- worker stderr ---\n" + self.log.read_text(errors="replace")[-4000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def run_kills(world_size: int, kills: int, seed: int, workdir: Path, tmpdir: Path, max_delay_s: float) -> KillRun:
    """``kills`` SIGKILLs of training children that save every step; after each, the next child resumes with
    ``ckpt_path="last"`` and must start from the newest checkpoint whose save had started, never older than the
    newest whose save had returned, never earlier than the previous resume, with every checkpoint under a real name
    loadable. ``TMPDIR`` is ``tmpdir`` (another file system than ``workdir``, to catch copy-commits).

    Raises:
        KillRunFailed: naming the trial and what was wrong.
    """
    rng = random.Random(seed)
    directory = workdir / "checkpoints"
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    zygotes = [_Zygote(world_size, r, directory, workdir / f"worker{r}.log", env) for r in range(world_size)]
    run, confirmed, saving, pids = KillRun(), 0, 0, []
    try:
        for trial in range(kills + 1):
            port = free_port()
            for zygote in zygotes:
                zygote.send(f"trial {port}")
            pids = [int(zygote.expect("child")) for zygote in zygotes]
            leftovers = 0
            while not (text := zygotes[0].line()).startswith("resumed"):
                leftovers = int(text.split()[1]) if text.startswith("leftovers") else leftovers
            resumed = int(text.split()[1])
            clean = zygotes[0].expect("clean") == "True"
            where = f"trial {trial} (seed {seed}, after {run.resumed})"
            if not (confirmed <= resumed <= saving) or resumed < max(run.resumed, default=0):
                raise KillRunFailed(
                    f"{where}: resumed at step {resumed}; the newest save that had returned was step {confirmed} "
                    f"and the newest that had started step {saving}\n{zygotes[0].tail()}"
                )
            if world_size > 1 and not clean:
                raise KillRunFailed(f"{where}: staging leftovers remain after the strategy was set up")
            run.resumed.append(resumed)
            run.mid_save += leftovers > 0
            if trial == kills:
                _kill(pids)
            else:
                confirmed, saving = _kill_during_saves(zygotes[0], pids, rng, max_delay_s, confirmed, saving)
                run.kills += 1
            for zygote in zygotes:
                while not zygote.line().startswith("exit"):
                    pass
            pids = []  # reaped: never signal these numbers again
    finally:
        _kill(pids)  # a failed check must not leave a child training on
        for zygote in zygotes:
            zygote.close()
    run.seconds = time.monotonic() - started
    return run


def _kill_during_saves(
    rank_zero: _Zygote, pids: list[int], rng: random.Random, max_delay_s: float, confirmed: int, saving: int
) -> tuple[int, int]:
    """Let the child start ``1..3`` saves, wait a random moment into the last one, SIGKILL every rank's child; read
    what rank zero said up to its exit. Returns the newest returned and the newest started save steps."""
    saves, delay, started_steps = rng.randint(1, 3), rng.uniform(0.0, max_delay_s), set()
    while len(started_steps) < saves:
        kind, step = rank_zero.line().split()
        step_number = int(step)
        if kind == "saving":
            started_steps.add(step_number)
            saving = max(saving, step_number)
        elif kind == "saved":
            confirmed = max(confirmed, step_number)
    time.sleep(delay)
    _kill(pids)
    while not (text := rank_zero.line()).startswith("exit"):
        kind, step = text.split()
        if kind == "saving":
            saving = max(saving, int(step))
        elif kind == "saved":
            confirmed = max(confirmed, int(step))
    rank_zero.pending = b"exit\n" + rank_zero.pending  # the caller waits for every worker's exit line
    return confirmed, saving


def other_file_system(path: Path) -> Path:
    """A temp directory on another file system than ``path`` (``/dev/shm``); skips the test where there is none."""
    import pytest

    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(path).st_dev:
        pytest.skip("needs /dev/shm on another file system than the test's temp directory")
    return shm


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
