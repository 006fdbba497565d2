import os
import tempfile

import pytest
import torch

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# the suite's MLflow Model templates (and their subprocesses') in a cache of its own, not the user's
os.environ.setdefault("PERMANENCE_CACHE_DIR", tempfile.mkdtemp(prefix="permanence-test-cache-"))
torch.set_num_threads(min(2, torch.get_num_threads()))


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
