"""The plugins work from LightningCLI YAML through class_path."""

import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI

from lightning_precision import PrecisionWarning
from tests.helpers import DictDataset, RecordingModule


class CLIModule(RecordingModule):
    def __init__(self, dim: int = 8):
        super().__init__(dim=dim)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(DictDataset(8), batch_size=4)


@pytest.mark.parametrize(
    ("class_path", "precision", "dtype"),
    [
        ("lightning_precision.HalfPrecisionForAudio", "bf16-true", torch.bfloat16),
        ("lightning_precision.FlashPrecision", "bf16-flash", torch.bfloat16),
    ],
)
def test_lightning_cli_class_path(tmp_path, class_path, precision, dtype):
    config = {
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 2,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            # A single mapping, as in the README; a list of them works too.
            "plugins": {"class_path": class_path, "init_args": {"precision": precision}},
        }
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.warns(PrecisionWarning, match="AdamW"):  # the helper module trains with torch AdamW
        cli = LightningCLI(CLIModule, args=["fit", "--config", str(path)], save_config_callback=None)
    seen = cli.model.seen[-1]
    assert seen["param"] == dtype and seen["audio"] == torch.float32 and seen["x"] == dtype
