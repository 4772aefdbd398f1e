"""Classes that a hostile config may name: building one writes a file, so a test can see whether it was built."""

from pathlib import Path


class WritesOnInit:
    """Writes ``path`` when built: a stand-in for any class with side effects in ``__init__``."""

    def __init__(self, path: str = "") -> None:
        Path(path).write_text("built")
