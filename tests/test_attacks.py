import pytest
import torch

from permanence.attacks import ATTACKS, build_attack
from permanence.errors import PermanenceError


def attack(name, strength=None, shape=(1, 16, 16)):
    return build_attack(name, target=0, strength=strength, image_shape=shape, seed=0)


def test_registry_lists_all_four():
    assert ATTACKS.names() == ["badnets", "blended", "sig", "wanet"]


def test_badnets_patch_lands_in_bottom_right_corner(images):
    out = attack("badnets").apply(images)
    assert (out[..., -3:, -3:] == 255).all()
    assert torch.equal(out[..., :-3, :], images[..., :-3, :])
    assert torch.equal(out[..., :, :-3], images[..., :, :-3])


def test_badnets_patch_size_follows_strength(images):
    out = attack("badnets", 4).apply(images)
    assert (out[..., -4:, -4:] == 255).all() and torch.equal(out[..., :-4, :], images[..., :-4, :])


def test_blended_mixes_a_fixed_pattern_with_alpha(images):
    a = attack("blended", 0.2)
    out = a.apply(images)
    expected = (0.8 * images.float() + 0.2 * a.pattern.float()).round()
    assert (out.float() - expected).abs().max() <= 1
    assert torch.equal(attack("blended", 0.2).pattern, a.pattern), "pattern must be reproducible from the seed"


def test_wanet_warps_slightly_and_deterministically(images):
    a = attack("wanet")
    out = a.apply(images)
    assert not torch.equal(out, images)
    assert torch.equal(out, attack("wanet").apply(images))
    assert (out.float() - images.float()).abs().mean() < 40


def test_sig_adds_horizontal_sinusoid():
    x = torch.full((2, 1, 8, 16), 100, dtype=torch.uint8)
    out = attack("sig", 40, (1, 8, 16)).apply(x).float()
    assert torch.allclose(out[:, :, 0], out[:, :, 5]), "the signal is the same on every row"
    assert (out - 100).abs().max() >= 39 and (out - 100).abs().max() <= 40


def _labels(n=100, target_share=0.1):
    y = torch.arange(n) % 10
    return y


def test_dirty_label_poisoning_relabels_ratio_of_non_target():
    y = _labels()
    x = torch.zeros(100, 1, 16, 16, dtype=torch.uint8)
    p = attack("badnets").poison(x, y, 0.1, torch.Generator().manual_seed(1))
    assert int(p.poisoned.sum()) == 10
    assert (p.y[p.poisoned] == 0).all() and (y[p.poisoned] != 0).all()
    assert torch.equal(p.y[~p.poisoned], y[~p.poisoned])
    assert (p.x[p.poisoned][..., -3:, -3:] == 255).all() and (p.x[~p.poisoned] == 0).all()


def test_sig_is_clean_label_and_poisons_only_target_class():
    y = _labels()
    x = torch.full((100, 1, 16, 16), 100, dtype=torch.uint8)
    p = attack("sig").poison(x, y, 0.05, torch.Generator().manual_seed(1))
    assert torch.equal(p.y, y), "clean-label: no label changes"
    assert int(p.poisoned.sum()) == 5 and (y[p.poisoned] == 0).all()


def test_wanet_noise_mode_warps_extra_images_but_keeps_their_labels():
    y = _labels()
    x = torch.randint(0, 255, (100, 1, 16, 16), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    p = attack("wanet").poison(x, y, 0.1, torch.Generator().manual_seed(1))
    changed = (p.x != x).flatten(1).any(1)
    noise_mode = changed & ~p.poisoned
    assert int(p.poisoned.sum()) == 10
    assert int(noise_mode.sum()) == 20, "cross ratio 2: twice as many noise-mode samples"
    assert torch.equal(p.y[noise_mode], y[noise_mode])


@pytest.mark.parametrize("name,strength", [("badnets", 0), ("badnets", 2.5), ("badnets", 12), ("blended", 1.5), ("sig", 300)])
def test_invalid_strength_is_one_line_error(name, strength):
    with pytest.raises(PermanenceError, match=r"^attack\.strength: .*allowed"):
        attack(name, strength)


def test_wanet_cross_ratio_sets_the_noise_mode_and_other_attacks_ignore_it():
    y = _labels()
    x = torch.randint(0, 255, (100, 1, 16, 16), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    for ratio, expected in ((0, 0), (1, 10)):
        wanet = build_attack("wanet", target=0, strength=None, image_shape=(1, 16, 16), seed=0, cross_ratio=ratio)
        p = wanet.poison(x, y, 0.1, torch.Generator().manual_seed(1))
        assert int(((p.x != x).flatten(1).any(1) & ~p.poisoned).sum()) == expected
    badnets = build_attack("badnets", target=0, strength=None, image_shape=(1, 16, 16), seed=0, cross_ratio=0)
    assert not hasattr(badnets, "cross_ratio")
