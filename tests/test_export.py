"""``export_weights``: a checkpoint's weights as safetensors, each from the most exact value the checkpoint holds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lightning_precision import CompensatedAdamW, HalfPrecisionForAudio, export_weights
from lightning_precision.errors import CheckpointExportError, PrecisionConfigError
from lightning_precision.export_record import PARAM_NAMES_KEY
from lightning_precision.report import CHECKPOINT_KEY
from tests.helpers import QUIET_TRAINER, loader


class NormedModule(pl.LightningModule):
    """Linear -> LayerNorm -> BatchNorm -> Linear, trained with CompensatedAdamW (norms kept fp32 by the plugin)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.bn = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 1)

    def training_step(self, batch, batch_idx):
        x = batch["x"] + batch["audio_signal"].to(batch["x"].dtype)
        out = self.head(self.bn(self.norm(self.inp(x))))
        return nn.functional.mse_loss(out.float(), batch["y"].float())

    def configure_optimizers(self):
        return CompensatedAdamW(self.parameters(), lr=3e-3)


def exact_values(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """What each parameter really is after training: ``p + c`` in fp32 where a compensation exists."""
    out = {}
    for name, p in module.named_parameters():
        c = optimizer.state.get(p, {}).get("compensation")
        out[name] = p.detach().float() + c.float() if c is not None else p.detach().clone()
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A compensated bf16 run of a few steps, its checkpoint and the exact weights of the live module."""
    tmp = tmp_path_factory.mktemp("run")
    module = NormedModule()
    plugin = HalfPrecisionForAudio("bf16-true", fp32_modules=["norm", "bn"], on_unsafe="ignore")
    trainer = pl.Trainer(**{**QUIET_TRAINER, "max_steps": 4}, plugins=[plugin])
    trainer.fit(module, loader())
    trainer.save_checkpoint(tmp / "run.ckpt")
    optimizer = trainer.optimizers[0]
    compensation = {n: optimizer.state[p]["compensation"].clone() for n, p in module.named_parameters()
                    if "compensation" in optimizer.state[p]}
    return {
        "ckpt": tmp / "run.ckpt",
        "exact": exact_values(module, optimizer),
        "compensation": compensation,
        "names": [n for n, _ in module.named_parameters()],
        "state": {k: v.clone() for k, v in module.state_dict().items()},
    }


def test_compensated_run_has_nonzero_compensation(run):
    # Precondition of the tests below: exporting p alone would differ from p + c.
    assert set(run["compensation"]) == {"inp.weight", "inp.bias", "head.weight", "head.bias"}
    assert any(c.abs().max() > 0 for c in run["compensation"].values())


def test_fp32_export_is_exactly_p_plus_compensation(run, tmp_path):
    export_weights(run["ckpt"], tmp_path, dtype="fp32")
    out = load_file(tmp_path / "model.safetensors")
    for name, exact in run["exact"].items():
        assert out[name].dtype == torch.float32
        assert torch.equal(out[name], exact.float()), name


def test_bf16_export_is_the_sum_rounded_to_nearest(run, tmp_path):
    export_weights(run["ckpt"], tmp_path, dtype="bf16")
    out = load_file(tmp_path / "model.safetensors")
    for name in run["compensation"]:
        assert out[name].dtype == torch.bfloat16
        assert torch.equal(out[name], run["exact"][name].to(torch.bfloat16)), name


def test_rounding_of_the_sum_is_to_nearest_not_truncation(tmp_path):
    p = torch.ones(4, dtype=torch.bfloat16)
    ulp = 2.0**-7  # bf16 spacing above 1
    c = torch.tensor([0.6, 0.4, -0.3, 0.55], dtype=torch.bfloat16) * ulp
    checkpoint = {
        "state_dict": {"w": p},
        "optimizer_states": [{"state": {0: {"compensation": c}}, "param_groups": [{"params": [0]}]}],
        PARAM_NAMES_KEY: [["w"]],
    }
    torch.save(checkpoint, tmp_path / "c.ckpt")
    export_weights(tmp_path / "c.ckpt", tmp_path / "out", dtype="bf16")
    out = load_file(tmp_path / "out" / "model.safetensors")["w"]
    expected = (p.float() + c.float()).to(torch.bfloat16)
    assert torch.equal(out, expected)
    assert not torch.equal(out, p)  # the sum moved some values a whole ulp


def test_checkpoint_records_parameter_names_and_contract(run):
    checkpoint = torch.load(run["ckpt"], weights_only=True)
    assert checkpoint[PARAM_NAMES_KEY] == [run["names"]]
    assert checkpoint[CHECKPOINT_KEY]["fp32_modules"] == ["norm", "bn"]  # no PrecisionGuard: the plugin wrote it


def test_modules_kept_fp32_stay_fp32_in_a_bf16_export(run, tmp_path):
    result = export_weights(run["ckpt"], tmp_path, dtype="bf16")
    out = load_file(tmp_path / "model.safetensors")
    kept = {n for n, t in out.items() if t.dtype == torch.float32}
    assert kept == {n for n in run["state"] if n.startswith(("norm.", "bn.")) and run["state"][n].is_floating_point()}
    assert all(torch.equal(out[n], run["state"][n]) for n in kept)
    assert {t.name for t in result.tensors if t.kept_fp32} == kept


def test_keep_fp32_none_casts_every_floating_tensor(run, tmp_path):
    export_weights(run["ckpt"], tmp_path, dtype="bf16", keep_fp32="none")
    out = load_file(tmp_path / "model.safetensors")
    assert {t.dtype for n, t in out.items() if run["state"][n].is_floating_point()} == {torch.bfloat16}


def test_integer_buffers_are_written_as_stored(run, tmp_path):
    export_weights(run["ckpt"], tmp_path, dtype="bf16")
    out = load_file(tmp_path / "model.safetensors")
    assert out["bn.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(out["bn.num_batches_tracked"], run["state"]["bn.num_batches_tracked"])


def test_checkpoint_without_recorded_names_is_matched_by_order_and_shape(run, tmp_path):
    checkpoint = torch.load(run["ckpt"], weights_only=True)
    del checkpoint[PARAM_NAMES_KEY]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    export_weights(tmp_path / "old.ckpt", tmp_path / "out", dtype="fp32")
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(out[n], run["exact"][n].float()) for n in run["exact"])


def test_ambiguous_order_and_shape_match_is_refused(tmp_path):
    bf16 = lambda: torch.zeros(4, dtype=torch.bfloat16)  # noqa: E731
    # "a.running" (a buffer) has the shape and dtype of both parameters: param 0 could be either of the first two.
    checkpoint = {
        "state_dict": {"a.weight": bf16(), "a.running": bf16(), "b.weight": bf16()},
        "optimizer_states": [
            {
                "state": {0: {"compensation": bf16() + 1e-3}, 1: {"compensation": bf16()}},
                "param_groups": [{"params": [0, 1]}],
            }
        ],
    }
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with pytest.raises(CheckpointExportError, match="refusing to guess"):
        export_weights(tmp_path / "old.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sharded_output_has_an_hf_index_and_the_same_tensors(run, tmp_path):
    export_weights(run["ckpt"], tmp_path / "one", dtype="fp32")
    result = export_weights(run["ckpt"], tmp_path / "many", dtype="fp32", max_shard_size=200)
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(f.endswith(f"-of-{len(shards):05d}.safetensors") for f in shards)
    merged = {k: v for f in shards for k, v in load_file(tmp_path / "many" / f).items()}
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in result.tensors)
    assert set(index["weight_map"]) == set(merged)
    single = load_file(tmp_path / "one" / "model.safetensors")
    assert merged.keys() == single.keys() and all(torch.equal(merged[k], single[k]) for k in single)


def test_table_names_dtype_bytes_and_largest_change(run, tmp_path):
    result = export_weights(run["ckpt"], tmp_path, dtype="bf16")
    table = result.format_table()
    largest = max(t.max_abs_diff for t in result.tensors)
    assert largest > 0  # rounding p + c to bf16 changes something
    assert "bfloat16" in table and "float32" in table and f"{largest:.3g}" in table
    assert f"{sum(t.nbytes for t in result.tensors):,}" in table


# -- distributed checkpoint directories, read on one process ------------------------------------------------------


def save_dcp(path: Path, state_dict: dict, optimizer_state: dict) -> None:
    """A directory laid out as ModelParallelStrategy saves one (on one process)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"state_dict": state_dict, "optimizer_0": optimizer_state}, checkpoint_id=str(path), no_dist=True)
    torch.save({"global_step": 1}, path / "meta.pt")


def test_distributed_checkpoint_exports_p_plus_compensation(run, tmp_path):
    checkpoint = torch.load(run["ckpt"], weights_only=True)
    osd = checkpoint["optimizer_states"][0]
    by_name = dict(zip(checkpoint[PARAM_NAMES_KEY][0], osd["param_groups"][0]["params"]))
    state = {name: osd["state"][idx] for name, idx in by_name.items()}
    save_dcp(tmp_path / "dcp", checkpoint["state_dict"], {"state": state, "param_groups": []})
    export_weights(tmp_path / "dcp", tmp_path / "out", dtype="fp32")
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(out[n], run["exact"][n].float()) for n in run["exact"])
    assert torch.equal(out["bn.num_batches_tracked"], run["state"]["bn.num_batches_tracked"])


def test_distributed_checkpoint_with_a_missing_shard_is_refused(run, tmp_path):
    save_dcp(tmp_path / "dcp", {"w": torch.ones(3)}, {"state": {}})
    (shard,) = (tmp_path / "dcp").glob("*.distcp")
    shard.unlink()
    with pytest.raises(CheckpointExportError, match=shard.name):
        export_weights(tmp_path / "dcp", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- bad input --------------------------------------------------------------------------------------------------


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(CheckpointExportError, match="notes.ckpt"):
        export_weights(tmp_path / "notes.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_without_a_state_dict_is_refused(tmp_path):
    torch.save({"weights": torch.ones(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointExportError, match="state_dict"):
        export_weights(tmp_path / "plain.pt", tmp_path / "out")


def test_unknown_dtype_names_the_value_and_the_choices(run, tmp_path):
    with pytest.raises(PrecisionConfigError, match=r"'int8'.*bf16, fp16, fp32"):
        export_weights(run["ckpt"], tmp_path, dtype="int8")


def test_unknown_keep_fp32_names_the_value_and_the_choices(run, tmp_path):
    with pytest.raises(PrecisionConfigError, match=r"'all'.*auto, none"):
        export_weights(run["ckpt"], tmp_path, keep_fp32="all")


def test_an_unwritable_output_is_refused(run, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CheckpointExportError, match="not writable"):
        export_weights(run["ckpt"], blocker / "out")


def test_a_failure_mid_write_leaves_the_previous_export_untouched(run, tmp_path, monkeypatch):
    export_weights(run["ckpt"], tmp_path, dtype="fp32")
    before = (tmp_path / "model.safetensors").read_bytes()
    from lightning_precision import export_read

    calls = []

    def failing(self, entry):
        calls.append(entry.name)
        if len(calls) > 2:
            raise CheckpointExportError("disk went away")
        return original(self, entry)

    original = export_read.SingleFileReader.exact
    monkeypatch.setattr(export_read.SingleFileReader, "exact", failing)
    with pytest.raises(CheckpointExportError, match="disk went away"):
        export_weights(run["ckpt"], tmp_path, dtype="bf16")
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]  # no staging directory left behind
    assert (tmp_path / "model.safetensors").read_bytes() == before


# -- a Hugging Face model inside a LightningModule --------------------------------------------------------------


class LlamaModule(pl.LightningModule):
    def __init__(self, transformers) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.config = transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=32,
            tie_word_embeddings=True,
        )
        self.model = transformers.LlamaForCausalLM(self.config)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss.float()

    def configure_optimizers(self):
        return CompensatedAdamW(self.parameters(), lr=1e-2)


def test_hf_llama_round_trips_through_from_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")
    module = LlamaModule(transformers)
    trainer = pl.Trainer(**{**QUIET_TRAINER, "max_steps": 3}, plugins=[HalfPrecisionForAudio("bf16-true")])
    data = torch.utils.data.DataLoader(torch.randint(0, 64, (12, 8)), batch_size=4)
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "llama.ckpt")
    exact = exact_values(module.model, trainer.optimizers[0])

    result = export_weights(tmp_path / "llama.ckpt", tmp_path / "hf", dtype="fp32", strip_prefix="model.")
    module.config.save_pretrained(tmp_path / "hf")
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32)

    assert result.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in load_file(tmp_path / "hf" / "model.safetensors")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # re-tied by from_pretrained
    params = dict(loaded.named_parameters())
    assert params.keys() == exact.keys()
    assert all(torch.equal(params[n], exact[n].float()) for n in exact)


# -- a 2-rank FSDP2 checkpoint, exported on one process --------------------------------------------------------


@pytest.mark.distributed
def test_two_rank_fsdp2_checkpoint_exports_the_gathered_p_plus_compensation(tmp_path):
    from tests.strategies._launch import launch, rank_results

    worker = Path(__file__).parent / "strategies" / "_fsdp2_worker.py"
    rank_results(launch(worker, "compensated_save", tmp_path, nproc=2), "compensated_save", 2)
    # Beside the sharded checkpoint, rank 0 wrote the full (gathered) parameters and compensation of the live run.
    full = json.loads((tmp_path / "compensated_state.json").read_text())
    export_weights(tmp_path / "compensated.ckpt", tmp_path / "out", dtype="fp32")
    out = load_file(tmp_path / "out" / "model.safetensors")
    params = [k.removeprefix("param/") for k in full if k.startswith("param/")]
    assert any(any(v) for k, v in full.items() if k.startswith("compensation/"))  # else p alone would pass
    assert params and set(params) <= set(out)
    for name in params:
        p = torch.tensor(full[f"param/{name}"]).to(torch.bfloat16)  # stored bf16: its float list is exact
        c = torch.tensor(full[f"compensation/{name}"]).to(torch.bfloat16)
        assert torch.equal(out[name].flatten(), p.float() + c.float()), name
