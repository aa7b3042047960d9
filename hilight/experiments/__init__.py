"""Experiments: comparisons that train and evaluate several variants and decide between them (ablations of the
alignment loss, selection of vision weights). Sits above ``hilight.train`` and ``hilight.eval``, which never import it."""
