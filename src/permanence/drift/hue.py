import torchvision.transforms.v2.functional as TF

from permanence.drift import DRIFTS, Drift


def _shift_hue(x, shift: float, gen):
    wrapped = (shift + 0.5) % 1.0 - 0.5  # hue is an angle: k * delta wraps into [-0.5, 0.5)
    return TF.adjust_hue(x, wrapped)


DRIFTS.register("hue")(Drift("hue", _shift_hue, needs_color=True, unit="turns"))
