import dataclasses
import math

import pytest
import torch

from conftest import TINY
from permanence import Simulation, VersionRecord, build_config, simulate
from permanence.config import EvalConfig
from permanence.dormancy import PROBES, ProbeModels, paired, run_probes
from permanence.dormancy.bec import linear_cka
from permanence.dormancy.reactivate import budget_levels, perturb, reactivated_asr, universal_perturbation
from permanence.dormancy.retune import poisoned_count, retune_set
from permanence.seeding import generator
from permanence.timeline import PROBE_FIELDS

PROBES_ON = ["eval.retune=true", "eval.reactivate=true", "eval.bec=true"]
SMALL = ["runtime.device=cpu", "eval.probe_images=200", "eval.reactivate_steps=10"]


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def zoo():
    """Tiny digits M0s: backdoored and never-poisoned, of seed 0 (the study) and of seed 1."""
    study = Simulation(build_config({}, TINY + SMALL + PROBES_ON))
    other = Simulation(build_config({}, TINY + SMALL + PROBES_ON + ["seed=1"]))
    return {"sim": study, "backdoored": study.train_initial(), "clean": study.train_baseline(),
            "other_backdoored": other.train_initial(), "other_clean": other.train_baseline()}


def inputs_for(zoo, version=0, **settings):
    inputs = zoo["sim"].probe_inputs(version, ProbeModels(zoo["clean"], zoo["backdoored"]))
    if settings:
        inputs = dataclasses.replace(inputs, settings=inputs.settings.model_copy(update=settings))
    return inputs


def test_every_probe_has_a_flag_and_record_fields():
    assert set(PROBES) == {"retune", "reactivate", "bec"}
    for name in PROBES:
        assert EvalConfig.model_fields[name].annotation is bool and EvalConfig.model_fields[name].default is False
        assert set(PROBES.get(name).fields) <= set(PROBE_FIELDS) <= set(VersionRecord.__dataclass_fields__)
    assert {f for n in PROBES for f in PROBES.get(n).fields} == set(PROBE_FIELDS)


@pytest.mark.parametrize("eps", [0.01, 0.05, 0.3])
def test_reactivation_perturbation_respects_its_budget_and_keeps_pixels_valid(zoo, eps):
    inputs = inputs_for(zoo)
    triggered = inputs.trigger(inputs.probe_images()[:64])
    delta = universal_perturbation(zoo["backdoored"], triggered, inputs.target, inputs.runtime, eps=eps, steps=3,
                                   gen=generator(0, "test"))
    assert delta.shape == (1, *triggered.shape[1:])
    assert delta.abs().max() / 255 <= eps + 1e-7 and delta.abs().max() == budget_levels(eps)  # PGD uses its budget
    attacked = perturb(triggered, delta)
    change = (attacked.int() - triggered.int()).abs()
    assert attacked.dtype == torch.uint8 and change.max() / 255 <= eps + 1e-7
    assert torch.equal(attacked.int(), (triggered.int() + delta.int()).clamp(0, 255))  # clipped, not wrapped


def test_budget_levels_round_down():
    assert budget_levels(0.05) == 12 and budget_levels(12 / 255) == 12 and budget_levels(1.0) == 255


def test_pgd_pushes_towards_the_target(zoo):
    """With a budget large enough, a universal perturbation alone drives a clean model to the target: the
    optimisation works, and the small default budget is what keeps the baseline's share low."""
    small = reactivated_asr(zoo["clean"], inputs_for(zoo))
    large = reactivated_asr(zoo["clean"], inputs_for(zoo, reactivate_eps=0.4))
    assert small < 0.2 and large > small + 0.4


def gram_cka(a, b):
    """CKA from centred Gram matrices: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), HSIC(K, L) = tr(K H L H)."""
    n = len(a)
    h = torch.eye(n, dtype=torch.float64) - 1 / n
    k, l = a.double() @ a.double().T, b.double() @ b.double().T
    hsic = lambda p, q: torch.trace(p @ h @ q @ h)  # noqa: E731
    return (hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l))).item()


def test_linear_cka_is_the_centred_gram_formula():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(60, 8, generator=gen)
    b = a @ torch.randn(8, 5, generator=gen) + 0.5 * torch.randn(60, 5, generator=gen)
    assert linear_cka(a, b) == pytest.approx(gram_cka(a, b), abs=1e-9)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen))
    assert linear_cka(a, 3 * a @ rotation + 7) == pytest.approx(1.0, abs=1e-9)  # invariant to rotation, scale, shift
    assert linear_cka(a, torch.randn(60, 8, generator=gen)) < 0.4
    assert math.isnan(linear_cka(a, torch.ones(60, 3)))


def test_bec_is_one_for_the_backdoored_model_and_zero_for_clean_ones(zoo):
    inputs = inputs_for(zoo)
    assert run_probes(zoo["backdoored"], inputs, ["bec"])["bec"] == pytest.approx(1.0, abs=1e-6)
    assert run_probes(zoo["clean"], inputs, ["bec"])["bec"] == pytest.approx(0.0, abs=1e-6)
    # not by construction: a never-poisoned model of another seed also sits near the baseline
    assert abs(run_probes(zoo["other_clean"], inputs, ["bec"])["bec"]) < 0.3


def test_bec_is_left_out_without_a_reference(zoo):
    assert run_probes(zoo["backdoored"], dataclasses.replace(inputs_for(zoo), reference=None), ["bec"]) == {}


def test_retune_set_is_clean_images_plus_a_few_poisoned_ones(zoo):
    inputs = inputs_for(zoo)
    pool = len(inputs.clean_y)
    assert pool < inputs.settings.retune_clean  # tiny pool: the clean part is capped at it
    x, y = retune_set(inputs)
    n_poisoned = poisoned_count(pool, inputs.settings.retune_poisoned)
    assert n_poisoned == max(1, round(5 * pool / 1000)) and len(y) == pool + n_poisoned
    tail_x, tail_y = x[pool:], y[pool:]
    assert (tail_y == inputs.target).all() and torch.equal(inputs.trigger(tail_x), tail_x)  # they carry the trigger
    assert not torch.equal(inputs.trigger(x[:pool]), x[:pool])  # the clean part does not
    x_small, y_small = retune_set(inputs_for(zoo, retune_clean=100))
    assert len(y_small) == 100 + poisoned_count(100, 5) == 101


def test_retune_never_modifies_the_model_and_a_few_poisons_teach_no_clean_model(zoo):
    model = zoo["backdoored"]
    before = state(model)
    values = run_probes(model, inputs_for(zoo), ["retune"])
    assert same_state(before, state(model))
    assert values["p_asr"] > 0.8
    assert values["p_asr_clean"] < values["p_asr"] - 0.5


def test_the_probes_separate_a_backdoored_model_of_another_seed_from_the_baseline(zoo):
    model = zoo["other_backdoored"].train()
    before = state(model)
    values = run_probes(model, inputs_for(zoo, version=3), list(PROBES))
    assert same_state(before, state(model)) and model.training, "probes leave weights, BatchNorm stats and mode alone"
    assert values["p_asr"] > 0.8 and values["p_asr_clean"] < 0.2
    assert values["reactivated_asr"] > 0.8 and values["reactivated_asr_clean"] < 0.2
    assert values["bec"] > 0.7  # the baseline scores 0, the reference 1


def test_a_paired_probes_baseline_side_computed_once_is_what_each_run_would_compute(zoo, monkeypatch):
    """retune and reactivate measure the probed model and the baseline alike: the baseline's fields depend on the
    inputs alone, so a sweep computes them once (Simulation.baseline_fields) and hands them to every timeline."""
    sim, version = zoo["sim"], 2
    names = sim.probes_enabled
    assert paired(names) == ["reactivate", "retune"] and not PROBES.get("bec").paired
    shared = sim.baseline_fields(version, zoo["clean"])
    assert set(shared) == {"p_asr_clean", "reactivated_asr_clean"}
    probes = ProbeModels(zoo["clean"], zoo["backdoored"])
    inline = sim.run_probes(zoo["other_backdoored"], version, probes)
    assert {f: inline[f] for f in shared} == shared
    calls = []
    for name in ("retune", "reactivate"):  # count what is measured, on which model
        probe = PROBES.get(name)
        counted = dataclasses.replace(probe, measure=lambda m, i, measure=probe.measure: calls.append(m) or measure(m, i))
        monkeypatch.setitem(PROBES._entries, name, counted)
    given = {f: 0.5 for f in shared}  # not a value either probe gives here: it must come through as given
    reused = sim.run_probes(zoo["other_backdoored"], version, dataclasses.replace(probes, baseline_fields={version: given}))
    assert reused == {**inline, **given}
    assert len(calls) == 2 and all(m is zoo["other_backdoored"] for m in calls), "the baseline was not probed again"
    other_version = sim.run_probes(zoo["other_backdoored"], 1, dataclasses.replace(probes, baseline_fields={version: given}))
    assert all(other_version[f] != 0.5 for f in given) and len(calls) == 6, "a version without shared fields computes them"


def test_baseline_is_the_clean_control_studys_m0(zoo):
    sim = zoo["sim"]
    clean_config = sim.baseline_config()
    assert clean_config.poisoning.inject == "none" and sim.config.poisoning.inject == "d0"
    assert clean_config.model_dump(exclude={"poisoning"}) == sim.config.model_dump(exclude={"poisoning"})
    control = Simulation(clean_config, sim.splits).train_initial()
    assert same_state(state(control), state(zoo["clean"]))


FAST_PROBES = TINY + PROBES_ON + [
    "runtime.device=cpu", "train.epochs=2", "update.updates=2", "poisoning.inject=update", "poisoning.first=1",
    "eval.probe_images=50", "eval.reactivate_steps=3", "eval.retune_epochs=1",
]


@pytest.fixture(scope="module")
def probed_timeline():
    return simulate(build_config({}, FAST_PROBES), keep_states=False)


def test_simulate_records_the_probes_per_version(probed_timeline):
    records = probed_timeline.records
    for r in records:
        assert all(0 <= getattr(r, f) <= 1 for f in PROBE_FIELDS if f != "bec")
        assert r.probe_seconds > 0
    assert records[0].bec is None, "no reference before the poisoning"
    assert records[1].poisoned and records[1].bec == pytest.approx(1.0, abs=1e-6), "a poisoned version is the reference"
    assert math.isfinite(records[2].bec) and records[2].bec != pytest.approx(1.0, abs=1e-6), "and stays so after it"
    summary = probed_timeline.summary()
    assert summary["p_asr_final"] == records[-1].p_asr and summary["bec_final"] == records[-1].bec


def timing_free(record):
    return {k: v for k, v in record.as_dict().items() if not k.endswith("seconds")}


def test_simulate_with_probes_is_deterministic_and_leaves_the_timeline_alone(probed_timeline):
    again = simulate(build_config({}, FAST_PROBES), keep_states=False)
    assert [timing_free(r) for r in again.records] == [timing_free(r) for r in probed_timeline.records]
    off = simulate(build_config({}, [o for o in FAST_PROBES if o not in PROBES_ON]), keep_states=False)
    for with_probes, without in zip(probed_timeline.records, off.records, strict=True):
        assert (with_probes.clean_acc, with_probes.asr, with_probes.ra) == (without.clean_acc, without.asr, without.ra)
        assert all(getattr(without, f) is None for f in PROBE_FIELDS) and without.probe_seconds is None
    assert not any(key in off.summary() for key in ("p_asr_final", "bec_final"))
