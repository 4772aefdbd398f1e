import pytest

from lightning_precision._logging import reset_reported


@pytest.fixture(autouse=True)
def _fresh_warning_registry():
    """Every test sees warnings as a fresh process would."""
    reset_reported()
    yield
    reset_reported()


@pytest.fixture
def single_rank_group():
    """A one-process gloo group, enough to build real DTensors and FSDP2 shards in-process."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def run_scenario(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """For a distributed test module that names its ``WORKER`` script: run each scenario once per module on 2 ranks
    and return the per-rank observations (rank order)."""
    from tests.strategies._launch import scenario_runner

    return scenario_runner(request.module.WORKER, tmp_path_factory)
