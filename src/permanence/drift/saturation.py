import torchvision.transforms.v2.functional as TF

from permanence.drift import DRIFTS, Drift

DRIFTS.register("saturation")(
    Drift("saturation", lambda x, p, gen: TF.adjust_saturation(x, 1.0 + p), needs_color=True, unit="factor - 1")
)
