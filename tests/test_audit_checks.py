"""The blind audit's checks (Neural Cleanse, known triggers) on tiny digits models, and the verdict rules."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import TINY
from permanence import PermanenceError, Simulation, build_config
from permanence.attacks import build_attack
from permanence.audit import CHECKS, AuditData, CheckResult, InputNormalized, decide
from permanence.audit.neural_cleanse import (
    NeuralCleanseSettings, against_reference, anomaly_indices, invert_triggers, outlier_test,
)


# NC's steps are small (160 images of 16x16): a second thread buys nothing and, on a busy machine, costs 2-3x
# (measured: 3.6 s with 1 thread vs 9.7 s with 2 at load 5)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Trained:
    def __init__(self, overrides):
        self.sim = Simulation(build_config({}, [*TINY, "runtime.device=cpu", *overrides]))
        self.classifier = self.sim.train_initial()
        s = self.sim.splits
        self.model = InputNormalized(self.classifier, s.mean, s.std)
        # the audit sees clean images only: the (clean) update pool and the test set
        self.data = AuditData.from_images(torch.cat([s.pool_x, s.test_x]), torch.cat([s.pool_y, s.test_y]), s.num_classes)
        self._nc = None

    @property
    def nc(self) -> CheckResult:
        if self._nc is None:
            self._nc = CHECKS.get("neural_cleanse")(self.model, self.data, seed=0)
        return self._nc


@pytest.fixture(scope="module")
def badnets0():
    return Trained(["attack.target=0"])


@pytest.fixture(scope="module")
def badnets3():
    return Trained(["attack.target=3", "seed=2"])


@pytest.fixture(scope="module")
def clean():
    return Trained(["poisoning.inject=none"])


# --- the model wrapper ----------------------------------------------------------------------------

def test_input_normalized_matches_the_training_runtime(clean):
    images = clean.data.images[:8]
    expected = clean.classifier.eval()(clean.sim.runtime.prepare(images))
    assert torch.allclose(clean.model(images.float() / 255), expected, atol=1e-5)
    assert {"mean", "std"} <= set(dict(clean.model.named_buffers()))


def test_audit_data_accepts_float_images_and_rejects_bad_shapes(images):
    data = AuditData.from_images(images.float() / 255, torch.zeros(len(images)), num_classes=10)
    assert data.images.dtype == torch.uint8 and torch.equal(data.images, images)
    with pytest.raises(PermanenceError, match="audit data"):
        AuditData.from_images(images[0], torch.zeros(1))


# --- Neural Cleanse -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["badnets0", "badnets3"])
def test_neural_cleanse_flags_a_badnets_model_and_names_its_target(name, request):
    trained = request.getfixturevalue(name)
    target = trained.sim.config.attack.target
    result = trained.nc
    assert result.flagged, result.reason
    assert result.numbers["anomaly_index"] > 2
    assert result.target == target
    norms = result.extras["l1_norms"]
    assert min(range(10), key=norms.__getitem__) == target


def test_neural_cleanse_does_not_flag_a_clean_model(clean):
    result = clean.nc
    assert not result.flagged, result.reason


def test_a_flag_stands_only_where_a_never_poisoned_model_needs_a_larger_mask(badnets0, clean):
    settings = NeuralCleanseSettings()
    flagged = badnets0.nc
    against_clean = against_reference(flagged, clean.nc.extras["l1_norms"], settings)
    assert against_clean.flagged and against_clean.numbers["flagged"] == 1.0
    assert against_clean.numbers["reference_ratio"] <= 0.5
    assert against_clean.numbers["reference_l1"] == clean.nc.extras["l1_norms"][0]
    # a reference that needs as small a mask for the suspect class: a natural shortcut of the data, not a backdoor
    shortcut = list(clean.nc.extras["l1_norms"])
    shortcut[flagged.target] = flagged.extras["l1_norms"][flagged.target] * 1.1
    natural = against_reference(flagged, shortcut, settings)
    assert not natural.flagged and natural.numbers["flagged"] == 0.0
    assert natural.numbers["reference_ratio"] == pytest.approx(1 / 1.1)
    assert "natural small-mask class" in natural.reason
    assert natural.numbers["asr"] == flagged.numbers["asr"]  # the rest of the result is kept
    looser = against_reference(flagged, shortcut, NeuralCleanseSettings(max_reference_ratio=1.0))
    assert looser.flagged
    with pytest.raises(PermanenceError, match="reference norms for 10 classes"):
        against_reference(flagged, shortcut[:9], settings)
    with pytest.raises(PermanenceError, match="max_reference_ratio"):
        NeuralCleanseSettings.build({"max_reference_ratio": 0})


def test_recovered_trigger_works_on_held_out_images_and_as_a_trigger_function(badnets0):
    result = badnets0.nc
    assert result.asr >= 0.8, "the reverse-engineered trigger must transfer to images it was not optimised on"
    trigger = result.extras["trigger"]
    assert trigger.target == 0 and trigger.mask.shape == (1, 16, 16) and trigger.pattern.shape == (1, 16, 16)
    fn = trigger.as_trigger()
    victims = badnets0.data.images[badnets0.data.labels != 0][:100]
    out = fn(victims)
    assert out.dtype == torch.uint8 and out.shape == victims.shape and not torch.equal(out, victims)
    predicted = badnets0.model.eval()(out.float() / 255).argmax(1)
    assert (predicted == 0).float().mean() >= 0.8
    picture = trigger.render(scale=2)
    assert picture.dtype == np.uint8 and picture.shape == (32, 3 * 32 + 4, 3)


class CountingModel(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.batch_sizes = []

    def forward(self, x):
        self.batch_sizes.append(len(x))
        return self.inner(x)


def test_inversion_is_one_forward_per_step_over_all_classes(clean):
    counting = CountingModel(clean.model)
    settings = NeuralCleanseSettings(steps=7, batch_size=5)
    images = clean.data.images[:50].float() / 255
    inversion = invert_triggers(counting, images, 10, settings, torch.Generator().manual_seed(0))
    assert inversion.steps == 7
    assert counting.batch_sizes == [10 * 5] * 7
    assert inversion.masks.shape == (10, 1, 16, 16) and inversion.patterns.shape == (10, 1, 16, 16)
    assert all(p.requires_grad for p in clean.model.parameters()), "the model's parameters are left as they were"


def test_anomaly_index_counts_only_the_small_side():
    norms = [10.0, 11, 9, 10, 12, 8, 10, 11, 9, 50]
    indices = anomaly_indices(norms)
    assert indices[-1] < 0, "an unusually large mask is not a backdoor"
    small = anomaly_indices([1.0, 11, 9, 10, 12, 8, 10, 11, 9, 10])
    assert small[0] > 2 and max(small[1:]) < 2
    median, mad = 10.0, 1.4826 * 1.0
    assert small[0] == pytest.approx((median - 1.0) / mad)


# norms measured on digits small CNNs (window means): a clean M0 whose digit 5 needs a small mask, and a
# blended M0 whose other classes spread widely
CLEAN_WITH_AN_EASY_CLASS = [25.8, 46.5, 25.9, 26.8, 34.5, 15.4, 35.5, 24.2, 27.9, 24.6]
BLENDED_TARGET_3 = [39.8, 119.4, 63.7, 4.9, 98.7, 25.9, 108.1, 89.8, 30.2, 44.0]


def test_outlier_rules_differ_where_measured():
    ratio, mad = NeuralCleanseSettings(), NeuralCleanseSettings(rule="mad")
    easy = outlier_test(CLEAN_WITH_AN_EASY_CLASS, ratio)
    assert easy.suspect == 5 and not easy.flagged and easy.norm_ratio > 0.5
    assert outlier_test(CLEAN_WITH_AN_EASY_CLASS, mad).flagged, "NC's MAD rule flags the naturally easy class"
    blended = outlier_test(BLENDED_TARGET_3, ratio)
    assert blended.suspect == 3 and blended.flagged
    assert not outlier_test(BLENDED_TARGET_3, mad).flagged, "and misses a 5x smaller mask among spread-out norms"
    assert outlier_test([10.0] * 9 + [5.0], ratio).flagged and outlier_test([10.0] * 9 + [5.01], ratio).flagged is False


def test_neural_cleanse_rejects_unknown_options(clean):
    with pytest.raises(PermanenceError, match="neural_cleanse: unknown option 'stepz'"):
        CHECKS.get("neural_cleanse")(clean.model, clean.data, stepz=3)
    with pytest.raises(PermanenceError, match="rule"):
        CHECKS.get("neural_cleanse")(clean.model, clean.data, rule="median")


# --- known triggers -------------------------------------------------------------------------------

def test_known_triggers_finds_badnets_and_its_target(badnets3):
    result = CHECKS.get("known_triggers")(badnets3.model, badnets3.data)
    assert result.flagged, result.reason
    assert result.extras["top"][:2] == ("badnets", 3)
    assert result.asr >= 0.8
    assert len(result.extras["table"]) == 2 * 10, "badnets and sig (unseeded), each against every class"


def test_known_triggers_finds_nothing_on_a_clean_model(clean):
    result = CHECKS.get("known_triggers")(clean.model, clean.data)
    assert not result.flagged, result.reason
    assert result.asr < 0.5


def test_known_triggers_skips_seeded_patterns_without_their_seed(clean):
    without = CHECKS.get("known_triggers")(clean.model, clean.data)
    assert set(without.extras["skipped"]) == {"blended", "wanet"}
    tried = {row[0] for row in without.extras["table"]}
    assert tried == {"badnets", "sig"}
    with_seed = CHECKS.get("known_triggers")(clean.model, clean.data, seeds={"blended": 0})
    assert set(with_seed.extras["skipped"]) == {"wanet"}
    assert {row[0] for row in with_seed.extras["table"]} == {"badnets", "blended", "sig"}


def test_known_triggers_threshold_is_configurable(badnets3):
    result = CHECKS.get("known_triggers")(badnets3.model, badnets3.data, threshold=1.0, attacks=["badnets"])
    assert result.flagged == (result.numbers["caused"] >= 1.0)


class LeansToNine(nn.Module):
    """A clean model made to predict 9 for the 60% of images brightest in their top-left corner, trigger or not
    (a BadNets patch sits bottom-right): what an undertrained model's bias looks like to a trigger."""

    def __init__(self, model: nn.Module, images: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.cut = torch.quantile(self._corner(images.float() / 255), 0.4).item()

    @staticmethod
    def _corner(x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :6, :6].mean((1, 2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        logits[self._corner(x) > self.cut, 9] = 1e4
        return logits


def test_known_triggers_do_not_flag_a_models_own_leaning_to_a_class(clean):
    """The BadNets patch reaches an ASR of about 0.6 to class 9 on this clean model, as the clean images do without
    it: the trigger causes nothing, so nothing is flagged (an ASR read alone flagged it)."""
    model = LeansToNine(clean.model, clean.data.images)
    result = CHECKS.get("known_triggers")(model, clean.data, attacks=["badnets"])
    nine = next(row for row in result.extras["table"] if row[1] == 9)
    assert nine[2] >= 0.5 and nine[3] < 0.2, nine
    assert not result.flagged, result.reason


# --- verdict rules ----------------------------------------------------------------------------------

def check(flagged, asr, target=0):
    return {"flagged": float(flagged), "asr": asr, "target": float(target)}


NOTHING = check(False, 0.05)
PROBES_BACK = {"p_asr": 0.9, "p_asr_clean": 0.1, "reactivated_asr": 0.8, "reactivated_asr_clean": 0.2}
PROBES_GONE = {"p_asr": 0.2, "p_asr_clean": 0.1, "reactivated_asr": 0.3, "reactivated_asr_clean": 0.2}

VERDICT_CASES = [
    # (checks, dormancy numbers, expected verdict)
    ({"nc": check(True, 0.95), "known": NOTHING}, None, "backdoor"),
    ({"nc": check(True, 0.5)}, None, "backdoor"),  # ASR exactly alpha is live
    ({"nc": check(True, 0.4999)}, None, "inconclusive"),  # anomaly without a working trigger
    ({"nc": check(False, 0.99), "known": NOTHING}, None, "clean"),  # an unflagged trigger proves nothing
    ({"nc": check(True, math.nan)}, None, "inconclusive"),
    ({"nc": check(True, 0.95)}, PROBES_GONE, "backdoor"),  # live beats the probes
    ({"nc": NOTHING}, PROBES_BACK, "dormant"),
    ({"nc": NOTHING}, PROBES_GONE, "clean"),
    ({"nc": NOTHING}, {"p_asr": 0.5, "p_asr_clean": 0.25}, "dormant"),  # both boundaries inclusive
    ({"nc": NOTHING}, {"p_asr": 0.55, "p_asr_clean": 0.3}, "dormant"),  # 0.25 above despite float rounding
    ({"nc": NOTHING}, {"p_asr": 0.49, "p_asr_clean": 0.0}, "clean"),  # below alpha
    ({"nc": NOTHING}, {"p_asr": 0.9, "p_asr_clean": 0.66}, "clean"),  # the baseline comes back too
    ({"nc": NOTHING}, {"reactivated_asr": 0.8, "reactivated_asr_clean": 0.2}, "dormant"),  # re-activation alone
    ({"nc": NOTHING}, {"p_asr": 0.9, "p_asr_clean": 0.1, "reactivated_asr": 0.9, "reactivated_asr_clean": 0.8},
     "inconclusive"),  # the probes disagree
    ({"nc": NOTHING}, {"p_asr": 0.9}, "clean"),  # no baseline: the probe does not count
    ({"nc": NOTHING}, {"p_asr": 0.9, "p_asr_clean": math.nan}, "clean"),
    ({"nc": check(True, 0.2)}, PROBES_BACK, "dormant"),  # the probes explain the anomaly
    ({"nc": check(True, 0.2)}, PROBES_GONE, "inconclusive"),
    ({}, None, "clean"),
]


@pytest.mark.parametrize(("checks", "dormancy", "expected"), VERDICT_CASES)
def test_verdict_rules(checks, dormancy, expected):
    verdict = decide(checks, dormancy, alpha=0.5, margin=0.25)
    assert verdict.verdict == expected, verdict.reason
    assert verdict.numbers["alpha"] == 0.5 and verdict.reason


def test_verdict_reports_the_deciding_check_and_numbers():
    verdict = decide({"nc": check(True, 0.7, target=4), "known": check(True, 0.9, target=2)})
    assert verdict.decided_by == ("known",) and "class 2" in verdict.reason
    assert verdict.numbers["known.asr"] == 0.9 and "nc.asr" not in verdict.numbers


def test_verdict_takes_check_results_and_rejects_bad_input():
    result = CheckResult("known_triggers", True, check(True, 0.9), "found")
    assert decide({"known_triggers": result}).verdict == "backdoor"
    with pytest.raises(PermanenceError, match="lacks asr"):
        decide({"nc": {"flagged": 1.0}})
    with pytest.raises(PermanenceError, match="alpha"):
        decide({}, alpha=0)


# --- STRIP ------------------------------------------------------------------------------------------

def test_strip_flags_triggered_candidates_not_clean_ones(badnets0, clean):
    data = badnets0.data
    victims = data.images[data.labels != 0][:60]
    triggered = build_attack("badnets", target=0, strength=None, image_shape=data.image_shape, seed=0).apply(victims)
    run = CHECKS.get("strip")
    on_triggered = run(badnets0.model, data, candidates=triggered)
    on_clean = run(badnets0.model, data, candidates=victims)
    assert on_triggered.flagged and on_triggered.target == 0, on_triggered.reason
    assert on_triggered.numbers["flagged_share"] > 0.5 > on_clean.numbers["flagged_share"]
    assert not on_clean.flagged, on_clean.reason
    assert not run(clean.model, clean.data, candidates=triggered).flagged, "a clean model has no trigger to hold"
    assert not run(badnets0.model, data).flagged, "no candidates, nothing to judge"
