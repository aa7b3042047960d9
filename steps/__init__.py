"""ZenML steps: thin wrappers that load inputs, call one library function, log, and return artifacts."""

import os

# The experiment tracker steps log to: the active stack's (True), whichever stack recipe is in use (.zenml/*.yaml);
# HILIGHT_EXPERIMENT_TRACKER names one when a stack has several.
EXPERIMENT_TRACKER: bool | str = os.environ.get("HILIGHT_EXPERIMENT_TRACKER") or True
