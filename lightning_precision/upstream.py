"""Known faults of the libraries this one works with, by installed version: each names the version and the fix.

One entry per fault; the code that meets the affected setup asks :func:`affected` (or :func:`require_unaffected`)
here, so a version range is written once.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from lightning_precision.errors import PrecisionConfigError


@dataclass(frozen=True)
class KnownFault:
    """A fault of one package's releases.

    Attributes:
        package: Distribution name (``"lightning"``).
        releases: The affected releases, as a specifier (``">=2.6.0,<2.6.2"``).
        what: What goes wrong, in one sentence.
        fix: What to do about it.
        reference: Where upstream tracks it.
    """

    package: str
    releases: str
    what: str
    fix: str
    reference: str

    def message(self, version: Version) -> str:
        return f"{self.package} {version} is affected by a known fault: {self.what} ({self.reference}). Fix: {self.fix}"


LIGHTNING_FSDP_MIXED_INIT = KnownFault(
    package="lightning",
    releases=">=2.6.0,<2.6.2",
    what="its FSDP strategy with 'bf16-mixed' or '16-mixed' creates the parameters in the half dtype inside "
    "init_module()/configure_model(), so they are stored in half precision instead of fp32",
    fix="upgrade to lightning>=2.6.2, or use lightning_precision.strategies.FSDP2Strategy",
    reference="Lightning-AI/pytorch-lightning#21556, fixed by #21586",
)
FLASHOPTIM_DCP_CORRUPTION = KnownFault(
    package="flashoptim",
    releases="<0.1.3",
    what="its optimizer state is corrupted when saved with torch distributed checkpoint",
    fix="pip install 'flashoptim>=0.1.3'",
    reference="fixed in flashoptim 0.1.3",
)


def installed_version(package: str) -> Version | None:
    """The installed version of distribution ``package``; ``None`` if it is not installed or has no valid version."""
    try:
        return Version(importlib.metadata.version(package))
    except (importlib.metadata.PackageNotFoundError, InvalidVersion):
        return None


def affected(fault: KnownFault) -> str | None:
    """The message for ``fault`` if the installed release is affected, else ``None`` (also when not installed)."""
    version = installed_version(fault.package)
    if version is None or not SpecifierSet(fault.releases).contains(version, prereleases=True):
        return None
    return fault.message(version)


def require_unaffected(fault: KnownFault) -> None:
    """Refuse to go on with an affected release.

    Raises:
        PrecisionConfigError: If the installed release of ``fault.package`` is affected; the message names it.
    """
    message = affected(fault)
    if message is not None:
        raise PrecisionConfigError(message)
