"""fsdp2_parallelize through Fabric's ModelParallelStrategy on 2 CPU processes (gloo): each scenario runs once in
``_fsdp2_worker.py`` under torch.distributed.run, every rank writes what it observed, each test asserts one behaviour."""

from __future__ import annotations

from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_fsdp2_worker.py")

pytestmark = pytest.mark.distributed  # run_scenario (tests/conftest.py) launches WORKER on 2 ranks


def test_bf16_mixed_with_torch_adamw_stores_fp32_shards_and_computes_bf16(run_scenario):
    for rank in run_scenario("fit"):
        # Row-sharded DTensors over both ranks, stored in fp32: the dtype the rule chose for torch AdamW.
        assert (rank["is_dtensor"], rank["mesh_size"], rank["placements"]) == (True, 2, ["S(0)"])
        assert rank["local_rows"] * 2 == rank["global_rows"]
        assert rank["storage"] == ["float32"]
        assert rank["state"] == ["float32", "float32"]
        assert rank["inside"] == {"input": "bfloat16", "output": "bfloat16"}
        assert rank["plan"]["storage_dtype"] == "float32" and rank["plan"]["storage_was_auto"] is True
        assert rank["plan"]["mp_policy"]["reduce_dtype"] == "float32"
        assert rank["verdicts"] == ["safe"] and rank["precision_warnings"] == []


def test_contract_is_logged_on_rank_zero_only(run_scenario):
    rank0, rank1 = run_scenario("fit")
    assert rank0["contract_logged"] is True and rank0["contract_has_reduce"] is True
    assert rank1["contract_logged"] is False


def test_both_ranks_train_one_model(run_scenario):
    rank0, rank1 = run_scenario("fit")
    assert len(rank0["losses"]) == 3 and rank0["losses"] == rank1["losses"]


def test_sharded_save_and_load_round_trip(run_scenario):
    for rank in run_scenario("fit"):
        assert rank["checkpoint_is_dir"] is True and rank["loaded_step"] == 3
        assert rank["differs_before_load"] is True  # the load had something to restore
        assert rank["reloaded_equal"] is True and rank["reloaded_state_equal"] is True
        assert rank["reloaded_storage"] == ["float32"]


def test_plugin_fp32_modules_stay_fp32_shards_under_bf16_true(run_scenario):
    for rank in run_scenario("true_fp32_head"):
        assert (rank["head_storage"], rank["block_storage"]) == (["float32"], ["bfloat16"])
        assert rank["head_is_dtensor"] is True and rank["fp32_module_names"] == ["head"]
        assert rank["losses_finite"] is True and rank["precision_warnings"] == []


def test_bf16_true_with_torch_adamw_is_refused_on_every_rank_before_the_first_update(run_scenario):
    for rank in run_scenario("unsafe_error"):
        assert rank["raised"] == "PrecisionPairingError"
        assert "first optimizer step" in rank["message"] and "torch.optim.adamw.AdamW" in rank["message"]
        assert rank["unchanged"] is True and rank["state_empty"] is True


def test_fp32_accumulation_follows_the_parameters_fabric_sharded_after_convert(run_scenario):
    for rank in run_scenario("accumulate_fp32"):
        assert rank["released_each_micro_batch"] is True
        assert rank["buffers_are_fp32_shards"] == ["DTensor float32"]
        assert rank["buffered"] == rank["params"]
        assert rank["handed_equals_sum"] is True
        assert rank["pending_after_step"] is False
