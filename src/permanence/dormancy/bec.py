"""Backdoor existence coefficient: a stand-in for Zhu, Liang, Wu 2024's BEC (they compare activations of
backdoor-related neurons on poisoned samples between the defended and the backdoored model, on a scale where
a clean model is 0; this compares whole penultimate-layer representations).

What is compared: for `eval.probe_images` clean non-target images x_i, model m's joint representation
R(m) = [features_m(x_1) .. features_m(x_N), features_m(T(x_1)) .. features_m(T(x_N))], a (2N, p) matrix of
penultimate features (`model.features`) of the clean images and of the same images triggered. Linear CKA
(Kornblith et al. 2019, exact: centred linear Gram matrices, HSIC) between R(m) and R(reference), rescaled:

    bec = (CKA(R(version), R(reference)) - CKA(R(baseline), R(reference))) / (1 - CKA(R(baseline), R(reference)))

so the backdoored reference scores 1 and the never-poisoned baseline 0. The Gram matrix over the 2N images
says whether a triggered image sits with its own class (a clean model) or with the target class's images, all
triggered images together (a backdoored one). Why not the trigger response d_i = f(T(x_i)) - f(x_i): CKA centres
it over the images, which removes the common shift towards the target that is the backdoor's signature; on digits
a backdoored M0 of another seed scored only 0.33 that way (0.95 with R).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from permanence.dormancy import PROBES, Probe, ProbeInputs, evaluating
from permanence.errors import PermanenceError
from permanence.training import Runtime, embed


def linear_cka(a: Tensor, b: Tensor) -> float:
    """HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with linear kernels K = a a^T, L = b b^T and centred features,
    which equals ||b^T a||_F^2 / (||a^T a||_F ||b^T b||_F). NaN when either representation is constant."""
    a = a.double() - a.double().mean(0)
    b = b.double() - b.double().mean(0)
    denominator = torch.linalg.matrix_norm(a.T @ a) * torch.linalg.matrix_norm(b.T @ b)
    if denominator == 0:
        return float("nan")
    return (torch.linalg.matrix_norm(b.T @ a) ** 2 / denominator).item()


def joint_representation(model: nn.Module, images: Tensor, triggered: Tensor, runtime: Runtime,
                         batch_size: int = 1024) -> Tensor:
    """Penultimate features of the clean images, then of the triggered ones: (2N, p)."""
    if not isinstance(getattr(model, "features", None), nn.Module):
        raise PermanenceError("eval.bec: the model has no `features` module (its penultimate layer); "
                              "bec needs a Classifier")
    with evaluating(model):
        return torch.cat([embed(model, images, runtime, batch_size), embed(model, triggered, runtime, batch_size)])


def coefficient(version_vs_reference: float, baseline_vs_reference: float) -> float:
    if baseline_vs_reference == 1:
        return float("nan")
    return (version_vs_reference - baseline_vs_reference) / (1 - baseline_vs_reference)


def probe(model: nn.Module, inputs: ProbeInputs) -> dict[str, float]:
    assert inputs.reference is not None, "bec needs the backdoored reference model"
    images = inputs.probe_images()
    triggered = inputs.trigger(images)

    def representation(m: nn.Module) -> Tensor:
        return joint_representation(m, images, triggered, inputs.runtime, inputs.eval_batch_size)

    reference = representation(inputs.reference)
    baseline_cka = linear_cka(representation(inputs.baseline), reference)
    return {"bec": coefficient(linear_cka(representation(model), reference), baseline_cka)}


PROBES.register("bec")(Probe(probe, fields=("bec",), needs_reference=True))
