"""The project-local ZenML runtime: config directory, source root and the `hilight_local` stack.

``.zenml/stack.yaml`` (committed) is the recipe; ``ensure_stack`` creates or updates the
components it lists and activates the stack, so running it twice changes nothing. The ZenML
SQLite store, the artifact store and the MLflow SQLite DB all live under ``.zenml/`` and are
git-ignored.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path

import yaml

from hilight.env import apply_offline_defaults, package_versions, project_root

log = logging.getLogger(__name__)

RECIPE = Path(".zenml") / "stack.yaml"
CODE_ROOT = Path(__file__).resolve().parents[1]


# What a step's result depends on besides its parameters and inputs: the library, the step wrappers and the numeric
# libraries installed under them. ZenML's own cache key holds only the step function's source, so a fixed bug in the
# library, or an upgraded torch, would otherwise come back from the cache with the old result. Every file under these
# folders counts: Python, the model presets (JSON), anything else a step reads from the package. Not tests, configs
# (they are parameters) or docs; of the installed packages, those of ``hilight.env.NUMERIC_PACKAGES``.
CODE_DIRS = ("hilight", "steps")


@functools.cache
def code_digest() -> str:
    """SHA-256 over the paths and bytes of every file under ``CODE_DIRS`` (``__pycache__`` aside) and the versions of
    the numeric libraries, read once per process, at its first step: the process runs the code it imported, whatever
    changes on disk later."""
    h = hashlib.sha256(json.dumps(package_versions(), sort_keys=True).encode())
    for top in CODE_DIRS:
        for path in sorted((CODE_ROOT / top).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                h.update(path.relative_to(CODE_ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def code_cache_policy():
    """ZenML's default step cache key (parameters, inputs, the step function's source) plus ``code_digest``: a rerun
    after any change under ``CODE_DIRS`` trains and evaluates again instead of returning a result the current code
    would not produce. Every pipeline run and schedule uses it."""
    from zenml.config.cache_policy import CachePolicy

    return CachePolicy(cache_func=f"{__name__}.code_digest")  # by import path: ZenML loads it at each step


def configure_zenml(root: Path | None = None) -> Path:
    """Point ZenML at ``<root>/.zenml`` (unless ``ZENML_CONFIG_PATH`` is set) and go offline.

    Must run before ``zenml`` is imported for the config path to take effect.
    """
    root = root or project_root()
    apply_offline_defaults()
    os.environ.setdefault("ZENML_CONFIG_PATH", str(root / ".zenml"))
    from zenml.utils import source_utils

    # the source root is where the step code lives (this checkout), not where the data is
    source_utils.set_custom_source_root(str(CODE_ROOT))
    return root


def recipe_path(root: Path) -> Path:
    """``HILIGHT_STACK_RECIPE`` (e.g. ``.zenml/remote_stack.yaml``) or the local recipe, relative to ``root``."""
    return root / os.environ.get("HILIGHT_STACK_RECIPE", str(RECIPE))


def load_recipe(root: Path) -> dict:
    path = recipe_path(root)
    if not path.is_file():
        raise FileNotFoundError(f"stack recipe {path} is missing; it ships with the project (git checkout -- {RECIPE})")
    recipe = yaml.safe_load(path.read_text())
    for key in ("stack", "components"):
        if key not in recipe:
            raise ValueError(f"stack recipe {path} lacks {key!r}")
    return recipe


def _resolve_config(config: dict, root: Path) -> dict:
    out = dict(config or {})
    if "path" in out and "://" not in out["path"] and not os.path.isabs(out["path"]):
        out["path"] = str((root / out["path"]).resolve())
    return out


def ensure_stack(root: Path | None = None) -> str:
    """Create/update the recipe's components and stack, activate it, create the MLflow store; returns the stack
    name. Runs under a file lock: two commands started at once on a fresh project would otherwise race to create
    (and migrate) the same SQLite stores."""
    from filelock import FileLock

    root = configure_zenml(root)
    (root / ".zenml").mkdir(parents=True, exist_ok=True)
    with FileLock(root / ".zenml" / "hilight.lock", timeout=600):
        name = _ensure_stack(root)
        _init_tracking_store()
    return name


def _init_tracking_store() -> None:
    """Create a local MLflow SQLite store's tables now (MLflow would do it at the first call, racily)."""
    import mlflow

    uri = mlflow_tracking_uri()
    if uri.startswith("sqlite:"):
        mlflow.MlflowClient(uri).search_experiments(max_results=1)


def _ensure_stack(root: Path) -> str:
    from zenml.client import Client
    from zenml.enums import StackComponentType

    recipe = load_recipe(root)
    client = Client()
    for ctype, spec in recipe["components"].items():  # every flavor first: fail before registering anything
        _require_flavor(client, spec["flavor"], StackComponentType(ctype))
    components = {}
    for ctype, spec in recipe["components"].items():
        component_type = StackComponentType(ctype)
        config = _resolve_config(spec.get("config", {}), root)
        if config.get("path") and "://" not in config["path"]:
            Path(config["path"]).mkdir(parents=True, exist_ok=True)
        try:
            existing = client.get_stack_component(component_type, spec["name"], allow_name_prefix_match=False)
        except KeyError:
            client.create_stack_component(name=spec["name"], flavor=spec["flavor"], component_type=component_type,
                                          configuration=config)
            log.info("registered %s %s", ctype, spec["name"])
        else:
            if existing.flavor_name != spec["flavor"]:
                raise RuntimeError(f"ZenML {ctype} {spec['name']!r} exists with flavor {existing.flavor_name!r}, "
                                   f"the recipe wants {spec['flavor']!r}; delete it (zenml {ctype.replace('_', '-')} delete "
                                   f"{spec['name']}) or rename it in {recipe_path(root)}")
            if any(existing.configuration.get(k) != v for k, v in config.items()):
                client.update_stack_component(spec["name"], component_type, configuration=config)
                log.info("updated %s %s", ctype, spec["name"])
        components[component_type] = spec["name"]
    name = recipe["stack"]
    try:
        client.get_stack(name, allow_name_prefix_match=False)
    except KeyError:
        client.create_stack(name=name, components=components)
    if client.active_stack_model.name != name:
        client.activate_stack(name)
    return name


def _require_flavor(client, flavor: str, component_type) -> None:
    """The flavor must exist and its implementation import (its integration's packages installed)."""
    from zenml.stack.flavor import Flavor

    try:
        model = client.get_flavor_by_name_and_type(flavor, component_type)
        Flavor.from_model(model).implementation_class  # noqa: B018 (imports the integration's packages)
    except (KeyError, ImportError) as exc:
        raise RuntimeError(f"the stack recipe needs the ZenML {component_type.value} flavor {flavor!r}, which cannot "
                           f"be loaded ({exc}); run `zenml integration install {flavor} -y` (or the integration that "
                           "provides it) and try again") from None


def mlflow_tracking_uri() -> str:
    """The tracking URI of the active stack's MLflow experiment tracker."""
    from zenml.client import Client

    tracker = Client().active_stack.experiment_tracker
    if tracker is None or tracker.flavor != "mlflow":
        raise RuntimeError("the active ZenML stack has no MLflow experiment tracker; run `hilight stack` to create hilight_local")
    return tracker.get_tracking_uri()
