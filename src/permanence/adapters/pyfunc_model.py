"""A Permanence model version as an MLflow Model, logged with MLflow's models-from-code: this file is the model.

MLflow runs this file when the model loads; it builds the project's model class from `input.json` and loads
the weights with `torch.load(weights_only=True)`, so loading a version never unpickles code. Input: float32
images in [0, 1], shape (N, C, H, W); output: class scores (N, classes).

    model = mlflow.pyfunc.load_model("models:/digits_badnets@production")
    scores = model.predict(images)          # numpy float32 (N, C, H, W) in [0, 1]
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel


def load_classifier(weights: str | Path, spec: dict) -> torch.nn.Module:
    """The project's classifier with its weights, wrapped to take float images in [0, 1]."""
    from permanence.audit.model import InputNormalized
    from permanence.models import build_model

    classifier = build_model(spec["model"], spec["channels"], spec["num_classes"])
    classifier.load_state_dict(torch.load(weights, weights_only=True, map_location="cpu"))
    return InputNormalized(classifier, torch.tensor(spec["mean"]), torch.tensor(spec["std"])).eval()


class PermanenceClassifier(PythonModel):
    def load_context(self, context) -> None:
        spec = json.loads(Path(context.artifacts["input"]).read_text())
        self.model = load_classifier(context.artifacts["weights"], spec)

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.model(images).float().numpy()


mlflow.models.set_model(PermanenceClassifier())
