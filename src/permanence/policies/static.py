"""No update: the baseline that shows what drift does to an unmaintained model."""

from permanence.policies import POLICIES, TrainingSet, UpdateContext


@POLICIES.register("static")
def static(model, data: TrainingSet, ctx: UpdateContext):
    return model
