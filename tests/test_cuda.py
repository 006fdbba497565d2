"""The CUDA path (data, drift, triggers and training on the device, bf16 + channels_last): run where a GPU is."""

import math

import numpy as np
import pytest
import torch

from conftest import TINY
from permanence import Simulation, build_config, simulate
from permanence.attacks import ATTACKS
from permanence.drift import DRIFTS
from permanence.models import MODELS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = TINY + ["runtime.device=cuda", "update.updates=1"]


@pytest.fixture(scope="module")
def colour_npz(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("colour") / "colour.npz"
    np.savez(path, x_train=rng.integers(0, 255, (600, 16, 16, 3), dtype=np.uint8), y_train=rng.integers(0, 4, 600),
             x_test=rng.integers(0, 255, (120, 16, 16, 3), dtype=np.uint8), y_test=rng.integers(0, 4, 120))
    return path


def _finite(timeline):
    return all(math.isfinite(r.clean_acc) and math.isfinite(r.asr) for r in timeline.records)


@pytest.mark.parametrize("attack", ATTACKS.names())
def test_every_attack_on_cuda(attack):
    tl = simulate(build_config({}, CUDA + [f"attack.name={attack}"]))
    assert _finite(tl) and tl.records[0].n_poisoned > 0 and tl.states[0]["head.weight"].device.type == "cpu"


@pytest.mark.parametrize("drift", DRIFTS.names())
def test_every_drift_on_cuda(drift, colour_npz):
    sim = Simulation(build_config({}, ["data.name=npz", f"data.root={colour_npz}", f"drift.kind={drift}", "drift.delta=0.2",
                                       "runtime.device=cuda", "update.updates=2", "poisoning.inject=none"]))
    assert sim.splits.d0_x.device.type == "cuda"
    x = sim.training_set(2).x
    assert x.device.type == "cuda" and x.dtype == torch.uint8 and not torch.equal(x, sim.splits.pool_x)


@pytest.mark.parametrize("model", MODELS.names())
@pytest.mark.parametrize("policy", ["finetune", "stlr", "retrain"])
def test_models_and_policies_on_cuda(model, policy):
    tl = simulate(build_config({}, CUDA + [f"model.name={model}", f"update.policy={policy}", "train.epochs=1"]), keep_states=False)
    assert _finite(tl)


def test_compile_on_cuda():
    tl = simulate(build_config({}, CUDA + ["runtime.compile=true"]), keep_states=False)
    assert _finite(tl)
