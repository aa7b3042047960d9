"""Stack recipes: the remote recipe is well formed and, without its integrations installed, fails before
registering anything, naming the command that installs them; the accelerate launch configs parse."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import REPO


def test_remote_recipe_needs_its_integrations_and_registers_nothing_without_them(zenml_project, monkeypatch):
    import shutil

    from zenml.client import Client

    from pipelines.stack import ensure_stack

    recipe = yaml.safe_load((REPO / ".zenml" / "remote_stack.yaml").read_text())
    flavors = {t: c["flavor"] for t, c in recipe["components"].items()}
    assert flavors["orchestrator"] == "kubernetes" and flavors["artifact_store"] == "s3"
    assert recipe["components"]["experiment_tracker"]["config"]["tracking_uri"].startswith("https://")
    shutil.copy(REPO / ".zenml" / "remote_stack.yaml", zenml_project / ".zenml" / "remote_stack.yaml")
    monkeypatch.setenv("HILIGHT_STACK_RECIPE", ".zenml/remote_stack.yaml")
    with pytest.raises(RuntimeError, match="zenml integration install kubernetes"):
        ensure_stack()
    names = {c.name for c in Client().list_stack_components(size=100).items}
    assert not names & {c["name"] for c in recipe["components"].values()}
    monkeypatch.delenv("HILIGHT_STACK_RECIPE")
    assert ensure_stack() == "hilight_local"


@pytest.mark.parametrize("name, kind", [("ddp_multigpu.yaml", "MULTI_GPU"), ("deepspeed_zero2.yaml", "DEEPSPEED")])
def test_accelerate_configs_parse(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "configs" / "accelerate" / name))
    assert config.distributed_type.name == kind and config.num_processes >= 2
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == 2 and config.deepspeed_config["gradient_clipping"] == 1.0


def test_step_cache_key_follows_the_numeric_libraries(monkeypatch):
    import pipelines.stack as stack

    monkeypatch.setattr(stack, "code_digest", stack.code_digest.__wrapped__)  # uncached, so the patch is read
    installed = stack.code_digest()
    assert installed == stack.code_digest()  # the same code and libraries: the same key
    monkeypatch.setattr(stack, "package_versions", lambda: {"torch": "99.0"})
    assert stack.code_digest() != installed  # an upgraded torch trains again instead of returning the old result
