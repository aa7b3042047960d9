"""The HiLight pyfunc model as code (MLflow "models from code"): MLflow stores this file with the model and runs
it on load, so loading a registered model unpickles nothing (no CloudPickle of a Python object)."""

import mlflow

from hilight.registry import HiLightPyfunc

mlflow.models.set_model(HiLightPyfunc())
