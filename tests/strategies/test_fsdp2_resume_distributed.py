"""FSDP2Strategy resumes on 2 CPU processes (gloo): CompensatedAdamW across storage dtypes, optimizers switched on
resume, checkpoints whose metadata is missing or wrong, corrupt and misshapen optimizer state (issue 23 A2-A5).

Each scenario of ``_fsdp2_resume_worker.py`` runs its save/resume pairs once; every rank compares its own shards
bitwise in the worker and writes what it observed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.strategies._launch import scenario_runner

WORKER = Path(__file__).with_name("_fsdp2_resume_worker.py")

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def run_scenario(tmp_path_factory: pytest.TempPathFactory):
    return scenario_runner(WORKER, tmp_path_factory)


def _on_rank_zero_only(ranks: list[dict], key: str) -> list[str]:
    assert ranks[1][key] == []  # rank zero speaks for all
    return ranks[0][key]


# -- A2: CompensatedAdamW across storage dtypes ---------------------------------------------------------------------


def test_bf16_true_resumed_with_fp32_storage_folds_the_compensation_exactly_on_every_shard(run_scenario):
    ranks = run_scenario("storage")
    for rank in ranks:
        assert rank["widen_exact"] is True  # each fp32 shard == saved bf16 p + c, bitwise
        assert rank["widen"]["storage"] == ["float32"]
        assert rank["widen"]["state"] == {"exp_avg": "float32", "exp_avg_sq": "float32"}  # compensation folded away
    logs = _on_rank_zero_only([r["widen"] for r in ranks], "logs")
    assert any("folded the saved compensation" in line and "exactly" in line for line in logs)
    assert not any("nothing lost" in line for line in logs)
    assert ranks[0]["widen"]["warnings"] == []


def test_a_full_file_checkpoint_is_folded_exactly_too(run_scenario):
    for rank in run_scenario("storage"):
        assert rank["widen_full_file_exact"] is True  # saved on rank 0 as full tensors, each rank keeps its shards


def test_fp32_resumed_with_bf16_storage_seeds_the_compensation_with_the_residual(run_scenario):
    ranks = run_scenario("storage")
    for rank in ranks:
        assert rank["narrow_seeded"] is True  # p == bf16(p32), c == bf16(p32 - bf16(p32)), bitwise per shard
        assert rank["narrow"]["state"] == {"exp_avg": "bfloat16", "exp_avg_sq": "bfloat16", "compensation": "bfloat16"}
    (warning,) = _on_rank_zero_only([r["narrow"] for r in ranks], "warnings")
    assert "float32 into bfloat16" in warning and "about 16 of float32's 24 mantissa bits" in warning
    assert "nothing lost" not in warning and "losing the low bits" not in warning  # the residual was kept
    assert any("created from the full-precision weights" in line for line in ranks[0]["narrow"]["logs"])


# -- A4: the loaded tensors, not the metadata, decide -----------------------------------------------------------------


def test_narrowing_without_a_recorded_storage_dtype_is_detected_from_the_tensors(run_scenario):
    ranks = run_scenario("storage")
    assert all(r["no_record"]["raised"] is None for r in ranks)
    (warning,) = _on_rank_zero_only([r["no_record"] for r in ranks], "warnings")
    assert "stored in float32 into bfloat16 storage" in warning and "losing the low bits" in warning


def test_hand_edited_storage_dtype_loses_to_the_tensors_and_is_reported(run_scenario):
    ranks = run_scenario("storage")
    warnings = _on_rank_zero_only([r["edited_record"] for r in ranks], "warnings")
    assert any("stored in float32 into bfloat16 storage" in w for w in warnings)  # the record said bfloat16
    assert any("records storage_dtype='bfloat16'" in w and "stored in float32" in w for w in warnings)


# -- A3: the optimizer switched on resume ---------------------------------------------------------------------------


def test_torch_adamw_state_resumed_by_compensated_adamw_is_converted(run_scenario):
    for rank in run_scenario("switch"):
        assert rank["to_compensated"]["raised"] is None
        assert rank["to_compensated_seeded"] is True
        assert rank["to_compensated_moments"] is True  # both moments rounded once to bf16
        assert rank["to_compensated"]["state"]["compensation"] == "bfloat16"


def test_compensated_adamw_state_resumed_by_torch_adamw_in_fp32_is_folded(run_scenario):
    ranks = run_scenario("switch")
    for rank in ranks:
        assert rank["to_adamw"]["raised"] is None
        assert rank["to_adamw_folded"] is True and rank["to_adamw_moments"] is True
        assert rank["to_adamw"]["state"] == {"exp_avg": "float32", "exp_avg_sq": "float32"}
    assert any("resumed the state saved by CompensatedAdamW" in line for line in ranks[0]["to_adamw"]["logs"])


def test_compensated_adamw_state_resumed_by_torch_adamw_in_bf16_is_refused_naming_both_and_the_fix(run_scenario):
    for rank in run_scenario("switch"):
        result = rank["to_bf16_adamw"]
        assert result["raised"] == "OptimizerStateError"
        assert "torch.optim.adamw.AdamW cannot resume the state saved by CompensatedAdamW" in result["message"]
        assert "storage_dtype='float32'" in result["message"]


# -- A5: loaded state checked on every rank -------------------------------------------------------------------------


def test_corrupt_state_on_either_rank_is_refused_on_both_naming_each_tensor(run_scenario):
    rank0, rank1 = (r["corrupt"] for r in run_scenario("switch"))
    assert rank0["raised"] == rank1["raised"] == "OptimizerStateError"
    assert rank0["message"] == rank1["message"]  # rank 1 held the nan, rank 0 the negative exp_avg_sq
    assert "state['exp_avg'] of blocks.0.fc.weight holds nan/inf" in rank0["message"]
    assert "state['exp_avg_sq'] of blocks.1.fc.weight holds negative" in rank0["message"]


def test_misshapen_state_in_a_full_checkpoint_is_refused_naming_the_tensor(run_scenario):
    for rank in run_scenario("switch"):
        assert rank["misshapen"]["raised"] == "OptimizerStateError"
        assert "state['exp_avg'] of blocks.0.fc.weight has shape (16, 8)" in rank["misshapen"]["message"]
