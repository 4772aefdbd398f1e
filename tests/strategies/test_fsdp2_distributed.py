"""FSDP2Strategy on 2 CPU processes (gloo): each scenario runs once in ``_fsdp2_worker.py`` under torch.distributed.run,
every rank writes what it observed, and each test asserts one behaviour on those observations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers import needs_lightning_2_5_resume
from tests.strategies._launch import launch, rank_results

WORKER = Path(__file__).with_name("_fsdp2_worker.py")

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def run_scenario(tmp_path_factory: pytest.TempPathFactory):
    """Run a scenario once per module; return the per-rank observations (rank order)."""
    cache: dict[str, list[dict[str, Any]]] = {}

    def run(scenario: str) -> list[dict[str, Any]]:
        if scenario not in cache:
            cache[scenario] = rank_results(launch(WORKER, scenario, tmp_path_factory.mktemp(scenario)), scenario)
        return cache[scenario]

    return run


# -- fit without configure_model --------------------------------------------------------------------------------------


def test_parameters_are_dtensors_sharded_across_both_ranks(run_scenario):
    for rank in run_scenario("fit"):
        assert rank["sharded_by_strategy"] is True
        assert rank["is_dtensor"] is True
        assert rank["mesh_size"] == 2
        assert rank["placements"] == ["S(0)"]
        assert rank["local_rows"] * 2 == rank["global_rows"]


def test_storage_and_adamw_state_are_fp32(run_scenario):
    for rank in run_scenario("fit"):
        assert rank["storage"] == ["float32"]
        assert rank["strategy_storage"] == "float32"
        assert (rank["exp_avg"], rank["exp_avg_sq"]) == ("float32", "float32")


def test_blocks_compute_in_bf16(run_scenario):
    for rank in run_scenario("fit"):
        assert rank["inside"] == {"weight": "bfloat16", "input": "bfloat16", "output": "bfloat16"}
        assert rank["strategy_compute"] == "bfloat16"


def test_gradients_reduce_in_fp32_from_the_policy(run_scenario):
    for rank in run_scenario("fit"):
        assert (rank["policy_param"], rank["policy_reduce"]) == ("bfloat16", "float32")
        assert rank["strategy_reduce"] == "float32"


def test_lightning_autocast_is_not_stacked_on_the_policy(run_scenario):
    for rank in run_scenario("fit"):
        assert rank["precision"] == "bf16-mixed"
        assert rank["autocast_plugin"] == "_PolicyMixedPrecision"
        assert rank["batch"]["x"] == "float32"  # mixed precision does not cast inputs; the blocks' policy does


def test_both_ranks_see_the_same_loss(run_scenario):
    rank0, rank1 = run_scenario("fit")
    assert len(rank0["losses"]) == 4
    assert rank0["losses"] == rank1["losses"]
    assert rank0["probe_loss"] == rank1["probe_loss"]  # one model: same output on the same probe batch


# -- unsafe pairing under on_unsafe="error" ---------------------------------------------------------------------------


def test_bf16_storage_with_torch_adamw_raises_on_every_rank_before_the_first_step(run_scenario):
    for rank in run_scenario("unsafe_error"):
        assert rank["raised"] == "PrecisionPairingError"
        assert rank["global_step"] == 0
        assert "torch.optim.adamw.AdamW" in rank["message"] and "bfloat16" in rank["message"]


# -- half precisions through the plugins ------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-flash"])
def test_half_storage_is_cast_before_sharding_and_audio_stays_fp32(run_scenario, precision):
    for rank in run_scenario("plugins"):
        seen = rank[precision]
        assert seen["is_dtensor"] is True
        assert seen["storage"] == ["bfloat16"] and seen["strategy_storage"] == "bfloat16"
        assert seen["batch"] == {"x": "bfloat16", "audio_signal": "float32", "y": "bfloat16"}
        assert seen["inside"]["input"] == "bfloat16"
        assert seen["losses_finite"] is True


# -- checkpoints ------------------------------------------------------------------------------------------------------


@needs_lightning_2_5_resume
@pytest.mark.parametrize(("scenario", "is_dir"), [("resume", True), ("resume_full_file", False)])
def test_resume_matches_an_uninterrupted_run_bitwise(run_scenario, scenario, is_dir):
    # Bitwise: the checkpoint holds the fp32 shards and moments exactly, the data order is the same, and gloo's
    # reductions are deterministic, so the resumed steps repeat the uninterrupted run's arithmetic exactly.
    for rank in run_scenario(scenario):
        assert rank["checkpoint_is_dir"] is is_dir
        assert rank["global_step"] == rank["ref_step"] == 8
        assert rank["resumed_batches"] == rank["ref_batches"][4:]
        assert any(k.startswith("exp_avg_sq/") for k in rank["keys"])
        assert rank["bitwise"] is True and rank["max_abs_diff"] == 0.0


def test_precision_contract_reads_back_from_a_sharded_checkpoint_directory(run_scenario):
    for rank in run_scenario("contract_dir"):
        assert rank["checkpoint_is_dir"] is True
        assert (rank["storage"], rank["compute"], rank["reduce"]) == (["float32"], "bfloat16", "float32")


def test_resume_bf16_checkpoint_into_fp32_storage_is_an_exact_logged_upcast(run_scenario):
    rank0, rank1 = run_scenario("cross_upcast")
    assert rank0["storage"] == rank1["storage"] == ["float32"]
    assert rank0["bf16_representable_at_start"] and rank1["bf16_representable_at_start"]
    assert len(rank0["resume_logs"]) == 1 and "upcast" in rank0["resume_logs"][0]
    assert rank1["resume_logs"] == []  # rank zero only
    assert rank0["precision_warnings"] == rank1["precision_warnings"] == []


def test_resume_fp32_checkpoint_into_bf16_storage_warns(run_scenario):
    rank0, rank1 = run_scenario("cross_downcast")
    assert rank0["storage"] == ["bfloat16"]
    assert len(rank0["precision_warnings"]) == 1
    assert "float32" in rank0["precision_warnings"][0] and "bfloat16" in rank0["precision_warnings"][0]
    assert rank1["precision_warnings"] == []  # rank zero only


# -- fp32_modules ---------------------------------------------------------------------------------------------------


def test_fp32_module_keeps_fp32_shards_and_computes_in_fp32(run_scenario):
    for rank in run_scenario("fp32_modules"):
        assert (rank["head_storage"], rank["block_storage"]) == (["float32"], ["bfloat16"])
        assert rank["head_is_dtensor"] is True
        # The head's forward hook runs inside the fp32 boundary: fp32 in; the boundary hands bf16 on afterwards.
        assert rank["head_seen"] == {"input": "float32", "output": "float32"}
        assert rank["contract_fp32_modules"] == ["head"]
        assert rank["losses_finite"] is True


# -- the library's low-memory recipe: CompensatedAdamW under FSDP2 ---------------------------------------------------


@pytest.mark.parametrize(("saved_on", "resumed_on"), [(2, 1), (1, 2), (2, 2)], ids=["2->1", "1->2", "2->2"])
def test_compensated_adamw_checkpoint_resumes_across_world_sizes(tmp_path, saved_on, resumed_on):
    saved = rank_results(launch(WORKER, "compensated_save", tmp_path, nproc=saved_on), "compensated_save", saved_on)
    resumed = rank_results(
        launch(WORKER, "compensated_resume", tmp_path, nproc=resumed_on), "compensated_resume", resumed_on
    )
    expected_state = {"exp_avg": "bfloat16", "exp_avg_sq": "bfloat16", "compensation": "bfloat16"}
    assert saved[0]["storage"] == ["bfloat16"] and saved[0]["state"] == expected_state
    for rank in resumed:
        assert rank["world_size"] == resumed_on
        assert rank["restored_exactly"] is True
        assert {k.split("/")[0] for k in rank["keys"]} == {"param", "exp_avg", "exp_avg_sq", "compensation"}
        assert rank["storage"] == ["bfloat16"] and rank["state"] == expected_state


# -- accumulate_grad_dtype="float32" ---------------------------------------------------------------------------------


def test_fp32_accumulation_hands_the_step_the_fp32_sum_of_the_micro_batch_shards(run_scenario):
    for rank in run_scenario("accumulate_fp32"):
        assert rank["storage"] == ["bfloat16"]
        assert (rank["micro_batches"], rank["steps"]) == (4, 1)
        assert rank["micro_fresh"] is True  # every micro-batch's shard arrived on its own, not added to a bf16 sum
        assert rank["handed_dtype"] == ["bfloat16"]
        assert rank["equals_fp32_sum"] is True
        assert rank["pending_after_step"] is False


def test_fp32_accumulation_on_the_plugin_sweeps_the_sharded_gradients(run_scenario):
    for rank in run_scenario("accumulate_fp32_plugin"):
        assert rank["storage"] == ["bfloat16"]
        assert rank["released"] == [True] * 4
        assert rank["summed_dtypes"] == ["float32"]
        assert rank["equals_fp32_sum"] is True
        assert rank["pending_after_step"] is False
