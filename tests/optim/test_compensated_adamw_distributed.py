"""CompensatedAdamW on 2 CPU ranks (gloo): DTensor shards and FSDP2 match the single-process step."""

from pathlib import Path

import pytest

from tests.strategies._launch import launch, rank_results

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("_compensated_adamw_worker.py")


@pytest.fixture(scope="module")
def run_scenario(tmp_path_factory):
    cache = {}

    def run(scenario):
        if scenario not in cache:
            cache[scenario] = rank_results(launch(WORKER, scenario, tmp_path_factory.mktemp(scenario)), scenario)
        return cache[scenario]

    return run


@pytest.mark.parametrize("implementation", ["chunked", "reference", "compiled"])
def test_dtensor_step_matches_single_process_bitwise(run_scenario, implementation):
    ranks = run_scenario("dtensor")
    for rank, result in enumerate(ranks):
        assert result[implementation]["mismatches"] == [], f"rank {rank}"
    # The shards really are split (7 rows: 4 + 3), so each rank stepped only its part.
    assert ranks[0]["chunked"]["local_numels"][0] + ranks[1]["chunked"]["local_numels"][0] == 35


@pytest.mark.parametrize("implementation", ["chunked", "reference", "compiled"])
def test_stochastic_rounding_on_2_ranks_matches_1_process_bitwise(run_scenario, implementation):
    """Stochastically rounded bf16 moments: the same global model gives the same bits on 1 process and on 2 ranks
    (uneven Shard(0), Shard(1) and Replicate placements), because the noise hashes the global element index."""
    ranks = run_scenario("dtensor_stochastic")
    for rank, result in enumerate(ranks):
        assert result[implementation]["mismatches"] == [], f"rank {rank}"
    assert ranks[0]["chunked"]["local_numels"][0] + ranks[1]["chunked"]["local_numels"][0] == 35


def test_chunked_step_updates_local_shards_without_collectives(run_scenario):
    for result in run_scenario("dtensor"):
        assert result["chunked"]["collectives_in_step"] == 0


def test_fsdp2_chunked_equals_reference_and_state_saves_with_dcp(run_scenario):
    for rank, result in enumerate(run_scenario("fsdp2")):
        assert result["sharded"], rank
        assert result["chunked_equals_reference"], rank
        assert result["dcp"] == "ok", f"rank {rank}: {result['dcp']}"
