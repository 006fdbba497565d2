import torchvision.transforms.v2.functional as TF

from permanence.drift import DRIFTS, Drift

DRIFTS.register("brightness")(
    Drift("brightness", lambda x, p, gen: TF.adjust_brightness(x, 1.0 + p), unit="factor - 1")
)
