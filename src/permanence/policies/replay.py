"""Experience replay: fine-tune (finetune's recipe) on the update's data plus a bounded buffer of everything the
pipeline ingested before (D0 and every earlier update, poisoned images included), at most `update.replay.buffer`.

The buffer is Vitter's reservoir (algorithm R) over the stream version 0, 1, ..., each training set in index order.
Its decisions depend only on the stream's lengths and one seeded generator per version, so the buffer of update k is
rebuilt from `ctx.history()` and equals the reservoir an always-on pipeline would hold: no hidden state to resume.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from permanence.models import Classifier
from permanence.policies import POLICIES, TrainingSet, UpdateContext
from permanence.policies.finetune import finetune
from permanence.seeding import generator


def reservoir_picks(lengths: Sequence[int], capacity: int, seed: int) -> torch.Tensor:
    """Algorithm R's sample of the stream of training sets with these lengths: (version, index) rows, by slot.

    Item i of the stream (0-based) fills slot i while i < capacity; after that it draws j uniform in [0, i] and
    replaces slot j if j < capacity. Vectorised: a slot ends up holding the last item that wrote to it.
    """
    lengths = torch.tensor(list(lengths), dtype=torch.int64)
    total = int(lengths.sum())
    starts = torch.cumsum(lengths, 0) - lengths
    owner = torch.arange(min(capacity, total), dtype=torch.int64)
    if total > capacity:
        draws = [torch.rand(int(n), dtype=torch.float64, generator=generator(seed, "replay", v))
                 for v, n in enumerate(lengths.tolist())]
        position = torch.arange(total, dtype=torch.int64)
        slot = (torch.cat(draws) * (position + 1)).floor().to(torch.int64)
        writes = (position >= capacity) & (slot < capacity)
        owner = owner.scatter_reduce(0, slot[writes], position[writes], reduce="amax")
    version = torch.searchsorted(starts, owner, right=True) - 1
    return torch.stack([version, owner - starts[version]], 1)


def replay_set(earlier: Sequence[TrainingSet], capacity: int, seed: int) -> TrainingSet:
    """The buffer as one training set (images grouped by version; `version` is the last earlier one)."""
    picks = reservoir_picks([len(s.y) for s in earlier], capacity, seed)
    parts = []
    for v in picks[:, 0].unique().tolist():
        rows = picks[picks[:, 0] == v, 1].to(earlier[v].y.device)
        parts.append((earlier[v].x[rows], earlier[v].y[rows], earlier[v].poisoned[rows]))
    x, y, poisoned = (torch.cat(column) for column in zip(*parts, strict=True))
    return TrainingSet(earlier[-1].version, x, y, poisoned, earlier[-1].drift)


@POLICIES.register("replay", cost=1.8)
def replay(model: Classifier, data: TrainingSet, ctx: UpdateContext) -> Classifier:
    buffer = replay_set(ctx.history()[:-1], ctx.config.update.replay.buffer, ctx.config.seed)
    mixed = TrainingSet(data.version, torch.cat([data.x, buffer.x]), torch.cat([data.y, buffer.y]),
                        torch.cat([data.poisoned, buffer.poisoned]), data.drift)
    return finetune(model, mixed, ctx)
