"""Optional dependencies stay optional: the package imports and runs without the ``plot`` extra (matplotlib)."""

import subprocess
import sys
import textwrap

# Makes this interpreter behave as if matplotlib were not installed. Hiding the import alone is not enough:
# Lightning's torchmetrics decides from the installed distribution's metadata whether to import matplotlib.
_WITHOUT_MATPLOTLIB = textwrap.dedent(
    """
    import importlib.abc
    import importlib.metadata
    import sys

    class _NotInstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] == "matplotlib":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    _version = importlib.metadata.version

    def _version_without_matplotlib(name):
        if name.lower() == "matplotlib":
            raise importlib.metadata.PackageNotFoundError(name)
        return _version(name)

    sys.meta_path.insert(0, _NotInstalled())
    importlib.metadata.version = _version_without_matplotlib
    """
)


def _run_without_matplotlib(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_MATPLOTLIB + textwrap.dedent(code)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_import_leaves_matplotlib_out_of_sys_modules():
    proc = _run_without_matplotlib(
        """
        import lightning_precision
        import lightning_precision.cli.compare
        from lightning_precision import CheckedMixedPrecision, FlashPrecision, HalfPrecisionForAudio, PrecisionGuard
        from lightning_precision.cli import build_parser

        build_parser()
        print(sorted(name for name in sys.modules if name.partition(".")[0] == "matplotlib"))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
