import torch

from permanence.drift import DRIFTS, Drift


def _gaussian_noise(x: torch.Tensor, sigma: float, gen: torch.Generator) -> torch.Tensor:
    # torchvision's gaussian_noise draws from the global RNG; a generator keeps each update reproducible.
    noise = torch.randn(x.shape, generator=gen, device=x.device) * (sigma * 255.0)
    return (x.float() + noise).round().clamp(0, 255).to(torch.uint8)


DRIFTS.register("gaussian_noise")(Drift("gaussian_noise", _gaussian_noise, unit="sigma (of the 0-1 range)"))
