"""The paper's default update: SGD (momentum 0.9, wd 5e-4) at a constant lr for a few epochs."""

from permanence.policies import POLICIES, TrainingSet, UpdateContext
from permanence.training import sgd, train


@POLICIES.register("finetune")
def finetune(model, data: TrainingSet, ctx: UpdateContext):
    cfg = ctx.config.update
    optimizer = sgd(model, cfg.lr, cfg.momentum, cfg.weight_decay)
    train(model, data.x, data.y, epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer=optimizer,
          runtime=ctx.runtime, gen=ctx.gen, on_epoch=ctx.on_epoch, forward=ctx.forward)
    return model
