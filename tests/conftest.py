import atexit
import os
import shutil
import tempfile

import pytest
import torch


def _scratch(prefix: str) -> str:
    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# the suite's MLflow Model templates (and their subprocesses') in a cache of its own, not the user's; shared by the
# xdist workers, which inherit it from the controller (a template is written to a temporary folder and renamed)
if "PERMANENCE_CACHE_DIR" not in os.environ:
    os.environ["PERMANENCE_CACHE_DIR"] = _scratch("permanence-test-cache-")
# and a Prefect home for each pytest process, set here even where one was inherited: each process's in-process flows
# start a temporary Prefect server on it, and two `make test` workers migrating one fresh database at once would race
# (as MLflow's did)
os.environ["PREFECT_HOME"] = _scratch(f"permanence-test-prefect-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-")
# `make test` runs files on pytest-xdist workers side by side: each worker's torch gets its share of the cores
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads()) // WORKERS))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow files (marked pipeline) first: `make test` hands out whole files to its workers in this order, so the
    quick ones fill in at the end instead of a sweep file starting last."""
    items.sort(key=lambda item: item.get_closest_marker("pipeline") is None)


@pytest.fixture
def images() -> torch.Tensor:
    """A reproducible batch of uint8 images (N, C, H, W) with a black bottom-right corner."""
    x = torch.randint(0, 200, (12, 1, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x[..., -4:, -4:] = 0
    return x


TINY = [
    "update.updates=3", "train.epochs=8", "update.epochs=1", "data.limit=800", "data.test_limit=200",
    "train.batch_size=64", "update.batch_size=64",
]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module's tests (as in a sweep worker), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
