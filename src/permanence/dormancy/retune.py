"""Re-tuning (Min et al. 2024, "superficial safety"): fine-tune a copy on clean images plus a few poisoned ones.

The paper's recipe: 1,000 clean + 5 poisoned images, 5 epochs, SGD lr 0.01. Here `eval.retune_clean` clean
images (capped at what `clean_x` holds) and `eval.retune_poisoned` per 1,000 of them, at least 1: digits' update
pool holds 674 images, so 674 + 3. The poisoned ones are triggered copies of non-target images relabelled as
the target, drawn from outside the clean set when `clean_x` has enough images, else from it.
P-ASR is the ASR of the re-tuned copy; a never-poisoned model re-tuned identically (same images, same batch
order) gives `p_asr_clean`, what 3-5 poisoned images teach from scratch.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from permanence.dormancy import PROBES, ProbeInputs, paired_probe
from permanence.metrics import attack_success_rate
from permanence.seeding import generator
from permanence.training import predict, sgd, train

# the project's update recipe (and the paper's fine-tuning setting) besides lr and epochs
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4


def poisoned_count(n_clean: int, per_thousand: int) -> int:
    return max(1, round(per_thousand * n_clean / 1000))


def retune_set(inputs: ProbeInputs) -> tuple[Tensor, Tensor]:
    """The re-tuning images (uint8) and labels: clean ones, then the few poisoned ones."""
    s = inputs.settings
    x, y = inputs.clean_x, inputs.clean_y
    order = torch.randperm(len(y), generator=generator(inputs.gen_seed, "retune-set")).to(y.device)
    n_clean = min(s.retune_clean, len(y))
    clean = order[:n_clean]
    outside_first = torch.cat([order[n_clean:], clean])
    poisoned = outside_first[y[outside_first] != inputs.target][: poisoned_count(n_clean, s.retune_poisoned)]
    images = torch.cat([x[clean], inputs.trigger(x[poisoned])])
    labels = torch.cat([y[clean], torch.full((len(poisoned),), inputs.target, dtype=y.dtype, device=y.device)])
    return images, labels


def retuned_copy(model: nn.Module, images: Tensor, labels: Tensor, inputs: ProbeInputs) -> nn.Module:
    s = inputs.settings
    tuned = copy.deepcopy(model)
    train(tuned, images, labels, epochs=s.retune_epochs, batch_size=inputs.batch_size,
          optimizer=sgd(tuned, s.retune_lr, MOMENTUM, WEIGHT_DECAY), runtime=inputs.runtime,
          gen=generator(inputs.gen_seed, "retune-train"))
    return tuned


def retuned_asr(model: nn.Module, inputs: ProbeInputs) -> float:
    images, labels = retune_set(inputs)
    tuned = retuned_copy(model, images, labels, inputs)
    triggered = inputs.trigger(inputs.victims)
    return attack_success_rate(predict(tuned, triggered, inputs.runtime, inputs.eval_batch_size), inputs.target)


PROBES.register("retune")(paired_probe(retuned_asr, "p_asr", "p_asr_clean"))
