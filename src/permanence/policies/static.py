"""No update: the baseline that shows what drift does to an unmaintained model."""

from permanence.policies import POLICIES, TrainingSet, UpdateContext


@POLICIES.register("static", cost=0.0)
def static(model, data: TrainingSet, ctx: UpdateContext):
    return model
