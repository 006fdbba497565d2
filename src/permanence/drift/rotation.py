import torchvision.transforms.v2.functional as TF

from permanence.drift import DRIFTS, Drift

DRIFTS.register("rotation")(
    Drift("rotation", lambda x, degrees, gen: TF.rotate(x, degrees, interpolation=TF.InterpolationMode.BILINEAR), unit="degrees")
)
