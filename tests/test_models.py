import pytest
import torch

from permanence.models import MODELS, build_model


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_models_take_small_images_with_1_or_3_channels(name, channels, size):
    model = build_model(name, channels, 10).eval()
    with torch.no_grad():
        x = torch.randn(2, channels, size, size)
        assert model(x).shape == (2, 10)
        assert model.features(x).shape[0] == 2 and model.features(x).ndim == 2
    assert isinstance(model.head, torch.nn.Linear)


def test_resnet9_is_the_ffcv_variant():
    model = build_model("resnet9", 3, 10)
    assert model.logit_scale == 0.2 and model.head.in_features == 128
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 128, 128, 256, 256, 256, 128]
    assert convs[1].kernel_size == (5, 5) and convs[1].stride == (2, 2) and convs[-1].padding == (0, 0)
