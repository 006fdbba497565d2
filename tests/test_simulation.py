import numpy as np
import pytest
import torch

from conftest import TINY
from permanence import EpochEnd, Simulation, VersionEnd, build_config, simulate
from permanence.errors import PermanenceError


@pytest.fixture(scope="module")
def timeline():
    return simulate(build_config({}, TINY))


def test_tiny_digits_timeline_has_one_record_per_version(timeline):
    assert [r.version for r in timeline.records] == [0, 1, 2, 3]
    assert [r.drift for r in timeline.records] == [0, 3, 6, 9]
    assert [r.poisoned for r in timeline.records] == [True, False, False, False]
    assert len(timeline.states) == 4
    assert timeline.records[0].n_poisoned == round(0.1 * timeline.records[0].n_train)
    assert timeline.records[0].clean_acc > 0.5, "M0 learns the clean task"
    assert timeline.records[0].asr > 0.5, "M0 learns the backdoor"


def test_same_seed_gives_same_metrics_on_cpu(timeline):
    again = simulate(build_config({}, TINY))
    for a, b in zip(timeline.records, again.records, strict=True):
        assert (a.clean_acc, a.asr, a.ra) == (b.clean_acc, b.asr, b.ra)
    assert all(torch.equal(x, y) for x, y in zip(timeline.states[-1].values(), again.states[-1].values(), strict=True))


def test_another_seed_gives_another_split():
    a = Simulation(build_config({}, TINY))
    b = Simulation(build_config({}, TINY + ["seed=1"]))
    assert not torch.equal(a.splits.d0_y, b.splits.d0_y)


def test_progress_callback_sees_epochs_and_versions():
    events = []
    simulate(build_config({}, TINY + ["update.updates=1"]), on_event=events.append, keep_states=False)
    epochs = [e for e in events if isinstance(e, EpochEnd)]
    versions = [e for e in events if isinstance(e, VersionEnd)]
    assert [(e.version, e.epoch) for e in epochs] == [(0, e) for e in range(1, 9)] + [(1, 1)]
    assert [e.record.version for e in versions] == [0, 1]


def test_resumed_step_equals_uninterrupted_step(timeline):
    """Loading version 1's weights and running update 2 reproduces the uninterrupted version 2."""
    sim = Simulation(build_config({}, TINY))
    model = sim.load_model(timeline.states[1])
    model, record = sim.step(model, 2)
    assert (record.clean_acc, record.asr) == (timeline.records[2].clean_acc, timeline.records[2].asr)


def test_static_policy_keeps_weights_and_loses_accuracy_under_drift():
    tl = simulate(build_config({}, TINY + ["update.policy=static", "drift.delta=30"]))
    assert all(torch.equal(tl.states[0][k], tl.states[-1][k]) for k in tl.states[0])
    assert tl.records[-1].clean_acc < tl.records[0].clean_acc - 0.2
    assert tl.records[-1].train_seconds == 0 or tl.records[-1].train_seconds < 0.05


def test_injection_in_d1_poisons_only_update_1():
    sim = Simulation(build_config({}, TINY + ["poisoning.inject=update", "poisoning.first=1"]))
    assert [sim.is_poisoned(v) for v in range(4)] == [False, True, False, False]
    assert sim.training_set(1).is_poisoned and not sim.training_set(2).is_poisoned


def test_range_injection_is_persistent():
    sim = Simulation(build_config({}, TINY + ["poisoning.inject=range", "poisoning.first=1", "poisoning.last=2"]))
    assert [sim.is_poisoned(v) for v in range(4)] == [False, True, True, False]


def test_slice_update_data_draws_fresh_disjoint_slices():
    sim = Simulation(build_config({}, TINY + ["data.update_data=slice", "poisoning.inject=none"]))
    sets = [sim.training_set(v) for v in (1, 2, 3)]
    assert sum(len(s.y) for s in sets) == len(sim.splits.pool_y)
    whole = Simulation(build_config({}, TINY + ["poisoning.inject=none"]))
    assert len(whole.training_set(1).y) == len(whole.splits.pool_y)


def test_update_data_and_test_set_are_drifted():
    sim = Simulation(build_config({}, TINY + ["drift.delta=20", "poisoning.inject=none"]))
    assert torch.equal(sim.training_set(0).x, sim.splits.d0_x)
    assert not torch.equal(sim.training_set(1).x, sim.splits.pool_x)
    assert not torch.equal(sim.test_sets(1)[0], sim.splits.test_x)
    assert torch.equal(sim.test_sets(0)[0], sim.splits.test_x)


@pytest.mark.parametrize("policy", ["stlr", "retrain"])
def test_other_policies_run(policy):
    tl = simulate(build_config({}, TINY + [f"update.policy={policy}", "update.updates=1"]), keep_states=False)
    assert len(tl.records) == 2 and tl.records[1].train_seconds > 0


@pytest.mark.parametrize("attack", ["blended", "wanet", "sig"])
def test_other_attacks_run(attack):
    tl = simulate(build_config({}, TINY + [f"attack.name={attack}", "update.updates=1"]), keep_states=False)
    assert 0 <= tl.records[0].asr <= 1 and tl.records[0].n_poisoned > 0


@pytest.mark.parametrize("extra", [[], ["data.channels=3"]])
def test_hue_drift_on_grayscale_is_refused_not_ignored(extra):
    with pytest.raises(PermanenceError, match="drift.kind: hue does nothing to grayscale images"):
        Simulation(build_config({}, TINY + ["drift.kind=hue"] + extra))


def test_hue_drift_on_colour_images(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "colour.npz"
    np.savez(path, x_train=rng.integers(0, 255, (400, 8, 8, 3), dtype=np.uint8), y_train=rng.integers(0, 3, 400),
             x_test=rng.integers(0, 255, (60, 8, 8, 3), dtype=np.uint8), y_test=rng.integers(0, 3, 60))
    sim = Simulation(build_config({}, ["data.name=npz", f"data.root={path}", "drift.kind=hue", "drift.delta=0.1",
                                       "poisoning.inject=none", "update.updates=2"]))
    assert sim.splits.channels == 3 and not torch.equal(sim.training_set(2).x, sim.splits.pool_x)


def test_attack_target_must_be_a_class():
    with pytest.raises(PermanenceError, match="attack.target: 12 is not a class of digits"):
        Simulation(build_config({}, TINY + ["attack.target=12"]))


def test_summary_fields(timeline):
    s = timeline.summary()
    assert s["versions"] == 4 and s["last_poisoned_version"] == 0
    assert s["asr_injected"] == timeline.records[0].asr
    assert s["survivability"] == timeline.survivability()


def test_clean_control_has_no_survivability():
    tl = simulate(build_config({}, TINY + ["poisoning.inject=none", "update.updates=1"]), keep_states=False)
    assert tl.survivability() is None and not any(r.poisoned for r in tl.records)


def test_eval_batch_size_defaults_by_device_and_honours_an_explicit_value():
    assert Simulation(build_config({}, TINY + ["runtime.device=cpu"])).eval_batch_size == 64
    assert Simulation(build_config({}, TINY + ["runtime.device=cpu", "eval.batch_size=300"])).eval_batch_size == 300


def test_cpu_runtime_uses_channels_last():
    sim = Simulation(build_config({}, TINY + ["runtime.device=cpu"]))
    assert sim.new_model().features[2][0].weight.is_contiguous(memory_format=torch.channels_last)


def test_the_poisoned_update_can_run_another_policy_than_the_study():
    """poisoning.policy=finetune: an stlr study ingests the poison through a plain update, then runs stlr again."""
    args = TINY + ["poisoning.inject=update", "poisoning.first=1", "update.updates=2"]
    mixed = simulate(build_config({}, args + ["update.policy=stlr", "poisoning.policy=finetune"]))
    finetune = simulate(build_config({}, args + ["update.policy=finetune"]))
    stlr = simulate(build_config({}, args + ["update.policy=stlr"]))
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(mixed.states[1], finetune.states[1]) and not same(mixed.states[1], stlr.states[1])
    assert not same(mixed.states[2], finetune.states[2])
    with pytest.raises(PermanenceError, match=r"poisoning\.policy: unknown policy 'nope'"):
        build_config({}, ["poisoning.policy=nope"])


def test_initial_training_of_exactly_four_one_cycle_steps_runs():
    """torch's OneCycleLR divides by zero with a quarter warm-up of 4 steps; 2 epochs of a 2-batch D0 are 4 steps."""
    from permanence.training import batches_per_epoch

    sim = Simulation(build_config({}, ["data.limit=300", "data.test_limit=100", "train.epochs=2", "train.batch_size=128"]))
    assert 2 * batches_per_epoch(len(sim.splits.d0_y), 128, sim.runtime) == 4
    model = sim.train_initial()
    assert all(torch.isfinite(p).all() for p in model.parameters())
