"""ZenML steps: thin wrappers that load inputs, call one library function, log, and return artifacts."""

import os

# Name of the MLflow experiment tracker component in the active stack (see .zenml/stack.yaml).
EXPERIMENT_TRACKER = os.environ.get("HILIGHT_EXPERIMENT_TRACKER", "hilight_mlflow")
