"""Known upstream faults: an affected installed release is named, an unaffected one passes."""

import pytest
from packaging.version import Version

from lightning_precision import upstream
from lightning_precision.errors import PrecisionConfigError
from lightning_precision.upstream import FLASHOPTIM_DCP_CORRUPTION, LIGHTNING_FSDP_MIXED_INIT, affected


def _installed(monkeypatch, version):
    monkeypatch.setattr(upstream, "installed_version", lambda package: None if version is None else Version(version))


@pytest.mark.parametrize(("version", "hit"), [("2.5.5", False), ("2.6.0", True), ("2.6.1", True), ("2.6.2", False)])
def test_lightning_fsdp_mixed_init_fault_covers_2_6_0_and_2_6_1(monkeypatch, version, hit):
    _installed(monkeypatch, version)
    message = affected(LIGHTNING_FSDP_MIXED_INIT)
    assert (message is not None) is hit
    if hit:
        assert f"lightning {version}" in message and "lightning>=2.6.2" in message


def test_fault_of_a_package_that_is_not_installed_is_not_reported(monkeypatch):
    _installed(monkeypatch, None)
    assert affected(FLASHOPTIM_DCP_CORRUPTION) is None


def test_affected_flashoptim_is_refused_naming_the_version(monkeypatch):
    _installed(monkeypatch, "0.1.2")
    with pytest.raises(PrecisionConfigError, match=r"flashoptim 0\.1\.2 .*flashoptim>=0\.1\.3"):
        upstream.require_unaffected(FLASHOPTIM_DCP_CORRUPTION)


def test_installed_version_reads_the_real_metadata():
    import torch

    assert upstream.installed_version("torch").base_version == Version(torch.__version__).base_version
    assert upstream.installed_version("no-such-distribution-here") is None


@pytest.mark.parametrize("where", ["trainer", "fabric"])
def test_flash_precision_refuses_an_affected_flashoptim(monkeypatch, where):
    from lightning_precision import FlashPrecision
    from lightning_precision.fabric import FlashPrecision as FabricFlashPrecision

    _installed(monkeypatch, "0.1.2")
    plugin = FlashPrecision if where == "trainer" else FabricFlashPrecision
    with pytest.raises(PrecisionConfigError, match=r"flashoptim 0\.1\.2"):
        plugin("bf16-flash")
