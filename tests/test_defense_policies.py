"""The five retraining policies from the backdoor / continual-learning literature: each test shows the mechanism."""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY
from permanence import Simulation, build_config, simulate
from permanence.policies import POLICIES, UpdateContext
from permanence.policies.ewc import diagonal_fisher, ewc_penalty
from permanence.policies.fine_pruning import prune_least_active
from permanence.policies.fst import reinitialise_head
from permanence.policies.ft_sam import sam_perturbation
from permanence.policies.replay import replay_set, reservoir_picks
from permanence.seeding import generator
from permanence.training import batches_per_epoch, embed, predict

NEW_POLICIES = ["fst", "ft_sam", "fine_pruning", "replay", "ewc"]


@pytest.fixture(scope="module")
def base():
    return Simulation(build_config({}, TINY))


@pytest.fixture(scope="module")
def m0(base):
    return base.train_initial()


def make_sim(base, *overrides):
    return Simulation(build_config({}, TINY + list(overrides)), splits=base.splits)


def context(sim, version, forward=None):
    return UpdateContext(
        version=version, config=sim.config, runtime=sim.runtime, gen=generator(sim.config.seed, "train", version),
        fresh_model=lambda: sim.new_model(version),
        history=lambda: [sim.training_set(v) for v in range(version + 1)], forward=forward,
    )


def run_policy(sim, model, version, forward=None):
    policy = POLICIES.get(sim.config.update.policy)
    return policy(copy.deepcopy(model), sim.training_set(version), context(sim, version, forward))


def flat_parameters(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# --- fst ------------------------------------------------------------------------------------------------------
def test_fst_head_reinitialisation_is_fresh_and_seeded(m0):
    def reinit(seed):
        head = copy.deepcopy(m0.head)
        reinitialise_head(head, generator(seed, "fst-head", 1))
        return head.weight.detach()

    assert not torch.allclose(reinit(0), m0.head.weight)
    assert torch.equal(reinit(0), reinit(0)) and not torch.allclose(reinit(0), reinit(1))
    bound = 1 / m0.head.in_features**0.5
    assert reinit(0).abs().max() <= bound


def test_fst_starts_from_the_reinitialised_head_projected_to_the_old_norm(base, m0):
    """At a vanishing lr, training leaves the head where FST put it: re-drawn, then scaled to ||W_previous||."""
    sim = make_sim(base, "update.policy=fst", "update.fst.lr=1e-9")
    tuned = run_policy(sim, m0, 1)
    head = copy.deepcopy(m0.head)
    reinitialise_head(head, generator(sim.config.seed, "fst-head", 1))
    expected = head.weight.detach() * m0.head.weight.norm() / head.weight.norm()
    assert torch.allclose(tuned.head.weight, expected, atol=1e-5)
    assert not torch.allclose(tuned.head.weight, m0.head.weight, atol=1e-2)


def test_fst_ends_further_from_the_previous_head_than_finetune(base, m0):
    previous = m0.head.weight.detach()
    inner = {}
    for policy in ("fst", "finetune"):
        tuned = run_policy(make_sim(base, f"update.policy={policy}", "update.epochs=2"), m0, 1)
        inner[policy] = (tuned.head.weight * previous).sum().item()
        if policy == "fst":
            assert torch.isclose(tuned.head.weight.norm(), previous.norm(), rtol=1e-4), "projected back to the norm"
    assert inner["fst"] < inner["finetune"] - 0.5 * previous.norm().item() ** 2
    without_penalty = run_policy(make_sim(base, "update.policy=fst", "update.epochs=2", "update.fst.alpha=0"), m0, 1)
    assert inner["fst"] < (without_penalty.head.weight * previous).sum().item(), "the penalty pushes W off W_previous"


# --- ft_sam ---------------------------------------------------------------------------------------------------
def test_sam_perturbation_formulas():
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    plain = sam_perturbation(params, 0.7, adaptive=False)
    assert torch.isclose(torch.cat([e.flatten() for e in plain]).norm(), torch.tensor(0.7))
    assert all(torch.allclose(e, p.grad * 0.7 / torch.cat([q.grad.flatten() for q in params]).norm())
               for e, p in zip(plain, params, strict=True))
    scaled_norm = torch.cat([(p.abs() * p.grad).flatten() for p in params]).norm()
    adaptive = sam_perturbation(params, 2.0, adaptive=True)
    assert all(torch.allclose(e, 2.0 * p.pow(2) * p.grad / scaled_norm) for e, p in zip(adaptive, params, strict=True))


@pytest.mark.parametrize("adaptive, rho", [(False, 0.5), (True, 2.0)])
def test_ft_sam_takes_two_passes_per_step_at_the_configured_radius(base, m0, adaptive, rho):
    sim = make_sim(base, "update.policy=ft_sam", f"update.ft_sam.adaptive={adaptive}", f"update.ft_sam.rho={rho}")
    model = copy.deepcopy(m0)
    seen, backwards = [], []

    def counting(x):
        seen.append(flat_parameters(model))
        out = model(x)
        out.register_hook(lambda grad: backwards.append(1))
        return out

    data = sim.training_set(1)
    POLICIES.get("ft_sam")(model, data, context(sim, 1, forward=counting))
    steps = sim.config.update.epochs * batches_per_epoch(len(data.y), sim.config.update.batch_size, sim.runtime)
    assert len(seen) == 2 * steps and len(backwards) == 2 * steps
    for before, perturbed in zip(seen[0::2], seen[1::2], strict=True):
        step = perturbed - before
        if adaptive:  # ASAM: || e / |w| || = rho
            nonzero = before != 0
            step = step[nonzero] / before[nonzero].abs()
        assert step.norm().item() == pytest.approx(rho, rel=1e-3)
    assert not torch.equal(seen[-1], flat_parameters(m0)), "the base optimiser stepped"


# --- fine_pruning ---------------------------------------------------------------------------------------------
def test_fine_pruning_prunes_least_active_channels_and_respects_the_budget_and_accuracy_rule(base, m0):
    data = base.training_set(1)
    activity = embed(m0, data.x, base.runtime).mean(0)
    model = copy.deepcopy(m0)
    pruned = prune_least_active(model, data, base.runtime, ratio=0.5, max_acc_drop=1.0)
    assert len(pruned) == round(0.5 * m0.head.in_features), "no accuracy limit: the whole budget goes"
    kept = model.feature_mask.cpu() == 1
    assert activity[pruned].max() <= activity[kept].min()

    strict = copy.deepcopy(m0)
    before = (predict(strict, data.x, base.runtime) == data.y).float().mean()
    prune_least_active(strict, data, base.runtime, ratio=0.9, max_acc_drop=0.0)
    after = (predict(strict, data.x, base.runtime) == data.y).float().mean()
    assert after >= before and (strict.feature_mask == 0).sum() < 0.9 * m0.head.in_features


def test_pruned_channels_stay_zero_through_fine_tuning_reload_and_the_next_update(base, m0, tmp_path):
    sim = make_sim(base, "update.policy=fine_pruning", "update.fine_pruning.ratio=0.3",
                   "update.fine_pruning.max_acc_drop=0.2")
    probe = base.runtime.prepare(base.splits.test_x[:64])
    v1 = run_policy(sim, m0, 1)
    pruned = v1.feature_mask == 0
    assert pruned.any() and not (m0.feature_mask == 0).any()
    v1.eval()
    assert torch.equal(v1.features(probe)[:, pruned], torch.zeros(64, int(pruned.sum())))

    torch.save(v1.state_dict(), tmp_path / "v1.pt")
    reloaded = sim.new_model()
    reloaded.load_state_dict(torch.load(tmp_path / "v1.pt", weights_only=True))
    reloaded.eval()
    assert torch.equal(reloaded.feature_mask, v1.feature_mask)
    assert torch.equal(reloaded(probe), v1(probe))

    during = []  # runs after the mask hook, so it sees what the head sees, batch by batch
    reloaded.features.register_forward_hook(lambda module, inputs, out: during.append(out[:, pruned].abs().max()))
    v2 = run_policy(sim, reloaded, 2)
    assert len(during) > 1 and max(during) == 0, "zero during fine-tuning too"
    v2.eval()
    assert ((v2.feature_mask == 0) >= pruned).all(), "the mask only gains zeros"
    assert (v2.feature_mask == 0).sum() > pruned.sum()
    assert (v2.features(probe)[:, v2.feature_mask == 0] == 0).all()


def test_a_state_dict_saved_before_the_mask_existed_loads_as_unpruned(base, m0):
    old = {k: v for k, v in m0.state_dict().items() if k != "feature_mask"}
    model = base.new_model()
    model.feature_mask.zero_()
    model.load_state_dict(old)
    assert torch.equal(model.feature_mask, torch.ones_like(model.feature_mask))


# --- replay ---------------------------------------------------------------------------------------------------
def test_reservoir_is_algorithm_r():
    """The vectorised picks equal a plain sequential algorithm R that uses the same draws."""
    lengths, capacity, seed = [50, 30, 40], 20, 3
    slots = []
    position = 0
    for version, n in enumerate(lengths):
        draws = torch.rand(n, dtype=torch.float64, generator=generator(seed, "replay", version))
        for index in range(n):
            if position < capacity:
                slots.append((version, index))
            else:
                j = int(draws[index] * (position + 1))
                if j < capacity:
                    slots[j] = (version, index)
            position += 1
    assert [tuple(row) for row in reservoir_picks(lengths, capacity, seed).tolist()] == slots


def test_reservoir_stays_bounded_evolves_and_samples_the_whole_stream():
    lengths, capacity = [400] * 40, 100
    previous = None
    for k in range(1, len(lengths) + 1):
        picks = reservoir_picks(lengths[:k], capacity, seed=0)
        assert len(picks) == min(capacity, 400 * k) and len(set(map(tuple, picks.tolist()))) == len(picks)
        assert (picks[:, 0] < k).all() and (picks[:, 1] < 400).all()
        if previous is not None:  # a reservoir only swaps old items for new ones
            new = {tuple(r) for r in picks.tolist()} - {tuple(r) for r in previous.tolist()}
            assert all(v == k - 1 for v, _ in new)
        previous = picks
    assert torch.equal(reservoir_picks(lengths, capacity, 0), reservoir_picks(lengths, capacity, 0))
    assert not torch.equal(reservoir_picks(lengths, capacity, 0), reservoir_picks(lengths, capacity, 1))
    shares = torch.stack([torch.bincount(reservoir_picks([400] * 10, capacity, s)[:, 0], minlength=10)
                          for s in range(20)]).float().mean(0) / capacity
    assert ((shares - 0.1).abs() < 0.03).all(), "every version equally likely, D0 included"


def test_replay_trains_on_the_update_plus_a_buffer_holding_d0_and_its_poison(base, m0):
    sim = make_sim(base, "update.policy=replay", "update.replay.buffer=150")
    history = [sim.training_set(v) for v in range(4)]
    buffer = replay_set(history[:-1], 150, sim.config.seed)
    picks = reservoir_picks([len(s.y) for s in history[:-1]], 150, sim.config.seed)
    assert len(buffer.y) == 150 and (picks[:, 0] == 0).any() and buffer.poisoned.any()
    images, model = [], copy.deepcopy(m0)
    POLICIES.get("replay")(model, history[-1], context(sim, 3, forward=lambda x: images.append(len(x)) or model(x)))
    assert sum(images) == sim.config.update.epochs * (len(history[0].y) + 150)


# --- ewc ------------------------------------------------------------------------------------------------------
def test_ewc_fisher_is_the_mean_squared_per_sample_gradient(base, m0):
    d0 = base.training_set(0)
    x, y = d0.x[:4], d0.y[:4]
    fisher = diagonal_fisher(m0, x, y, base.runtime, chunk=3)
    model = copy.deepcopy(m0).eval()
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(4):
        model.zero_grad()
        F.cross_entropy(model(base.runtime.prepare(x[i : i + 1])), y[i : i + 1]).backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad.pow(2) / 4
    assert all(torch.allclose(fisher[n], expected[n], atol=1e-6, rtol=1e-4) for n in expected)


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_quadratically(base, m0):
    d0 = base.training_set(0)
    fisher = diagonal_fisher(m0, d0.x[:32], d0.y[:32], base.runtime)
    anchor = {n: p.detach().clone() for n, p in m0.named_parameters()}
    direction = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) for n, p in anchor.items()}
    penalties = []
    for t in (0.0, 0.01, 0.02, 0.1):
        moved = copy.deepcopy(m0)
        with torch.no_grad():
            for n, p in moved.named_parameters():
                p.add_(t * direction[n])
        penalties.append(ewc_penalty(moved, anchor, fisher, weight=100.0).item())
    assert penalties[0] == 0 and penalties[1] < penalties[2] < penalties[3]
    assert penalties[2] / penalties[1] == pytest.approx(4, rel=1e-3)


def test_ewc_holds_the_fisher_weighted_distance_lower_than_finetune(base, m0):
    d0 = base.training_set(0)
    fisher = diagonal_fisher(m0, d0.x, d0.y, base.runtime)  # the policy's estimate: TINY's D0 has < 512 images
    anchor = {n: p.detach().clone() for n, p in m0.named_parameters()}
    distance = {}
    for policy in ("ewc", "finetune"):
        tuned = run_policy(make_sim(base, f"update.policy={policy}", "update.ewc.weight=1000"), m0, 1)
        distance[policy] = ewc_penalty(tuned, anchor, fisher, weight=1.0).item()
    assert distance["ewc"] < 0.5 * distance["finetune"]


# --- all five, end to end ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", NEW_POLICIES)
def test_policy_runs_end_to_end_and_is_deterministic_on_cpu(policy):
    overrides = [f"update.policy={policy}", "update.updates=2", "train.epochs=2", "runtime.device=cpu"]
    cfg = build_config({}, TINY + overrides)
    first, again = simulate(cfg), simulate(cfg)
    assert len(first.records) == 3 and first.records[2].train_seconds > 0
    assert all(0 <= r.clean_acc <= 1 and 0 <= r.asr <= 1 for r in first.records)
    assert [(r.clean_acc, r.asr, r.ra) for r in first.records] == [(r.clean_acc, r.asr, r.ra) for r in again.records]
    assert all(torch.equal(first.states[-1][k], again.states[-1][k]) for k in first.states[-1])
