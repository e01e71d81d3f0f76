"""Fixtures shared by the whole suite, and the ``dist`` marker's check.

Every test that starts more than one rank (``tests.distributed.run_distributed`` with a world above 1, a
``torchrun`` of 2 or more) carries ``@pytest.mark.dist``; the helpers that start them refuse otherwise, so
that ``-m "not slow and not dist"`` is the one-process tier.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

from data import shards  # noqa: E402
from dit.runtime import cpu_backend  # noqa: E402
from dit.runtime import distributed as runtime  # noqa: E402
from tests import distributed  # noqa: E402
from tests.tiny_data import DEFECTS, GOOD, TRUNCATED_GOOD, cut_shard, good_entries, write_dataset  # noqa: E402


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tell the launch helpers whether this test (and the fixtures it sets up) may start several ranks."""
    distributed.DIST_MARKED = item.get_closest_marker("dist") is not None


@pytest.fixture
def single_process(monkeypatch: pytest.MonkeyPatch):
    """World 1 in the test process itself (gloo and the CPU layer), torn down afterwards."""
    for key, value in dict(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(runtime.free_port())
    ).items():
        monkeypatch.setenv(key, value)
    runtime.init_distributed()
    runtime.initialize_model_parallel(runtime.ParallelLayout())
    runtime.set_random_seed(1234, per_data_parallel_rank=False)
    yield
    runtime.destroy()
    cpu_backend.disable()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """16 good samples of 4 to 24 tokens (latents [4, ...], text [1..5, 8]) indexed by `energon prepare`;
    read-only: a test that changes a dataset writes its own."""
    return str(write_dataset(tmp_path_factory.mktemp("tiny"), good_entries(16, seed=4)))


@pytest.fixture(scope="session")
def mixed_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 good samples with every defect of :data:`tests.tiny_data.DEFECTS` spread among them, 8 a shard."""
    good = good_entries(GOOD, seed=1)
    bad = [(f"bad_{i:02d}", files) for i, (files, _) in enumerate(DEFECTS.values())]
    entries = [e for pair in zip(good, bad) for e in pair] + good[len(bad) :]
    return write_dataset(tmp_path_factory.mktemp("mixed"), entries, per_shard=8)


@pytest.fixture(scope="session")
def truncated_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """24 good samples in 3 shards of 8; the middle shard cut in half after indexing.

    Returns the dataset folder and the names of the samples the cut made unreadable."""
    root = write_dataset(tmp_path_factory.mktemp("truncated"), good_entries(TRUNCATED_GOOD, seed=2), per_shard=8)
    return root, cut_shard(root / shards.shard_name(1))
