import torchvision.transforms.v2.functional as TF

from permanence.drift import DRIFTS, Drift

# Contrast fades as the parameter grows (factor 1 / (1 + p)): the fog-like drift of a degrading camera.
DRIFTS.register("contrast")(
    Drift("contrast", lambda x, p, gen: TF.adjust_contrast(x, 1.0 / (1.0 + p)), unit="1/factor - 1")
)
