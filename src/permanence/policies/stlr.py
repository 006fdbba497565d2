"""Fine-tuning with a slanted triangular learning rate (Howard & Ruder 2018), peak `update.max_lr`."""

import math

from torch.optim.lr_scheduler import LambdaLR

from permanence.policies import POLICIES, TrainingSet, UpdateContext
from permanence.training import batches_per_epoch, sgd, train


def slanted_triangular(total_steps: int, cut_frac: float = 0.1, ratio: float = 32.0):
    """lr multiplier at step t: a short linear warm-up to 1, then a long linear decay to 1/ratio."""
    cut = max(1, math.floor(total_steps * cut_frac))

    def multiplier(t: int) -> float:
        p = t / cut if t < cut else 1 - (t - cut) / max(1, total_steps - cut)
        return (1 + max(0.0, p) * (ratio - 1)) / ratio

    return multiplier


@POLICIES.register("stlr", cost=1.3)
def stlr(model, data: TrainingSet, ctx: UpdateContext):
    cfg = ctx.config.update
    optimizer = sgd(model, cfg.max_lr, cfg.momentum, cfg.weight_decay)
    total = cfg.epochs * batches_per_epoch(len(data.y), cfg.batch_size, ctx.runtime)
    scheduler = LambdaLR(optimizer, slanted_triangular(total, cfg.cut_frac, cfg.ratio))
    train(model, data.x, data.y, epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer=optimizer,
          scheduler=scheduler, runtime=ctx.runtime, gen=ctx.gen, on_epoch=ctx.on_epoch, forward=ctx.forward)
    return model
