"""Weight selection: for each candidate (CLIP-ViP weights and/or stage-1/stage-2 overrides), stage 1 → stage 2 →
merge → evaluation (each cached per candidate, each in its own nested MLflow run; candidates whose stage-1 settings
are equal share one stage-1 run, ``SelectionConfig.stage1_owner``); the incumbent
``hilight-vlm@champion``, when there is one, is evaluated on the same sets (cached by its version, digest and the
evaluation fingerprints); then the declared rule decides: the best candidate takes ``@champion`` only when it beats
the incumbent by a margin whose interval clears ``rule.min_effect``, else it becomes ``@challenger``."""

from __future__ import annotations

from zenml import pipeline

from hilight.experiments.selection import SelectionConfig
from steps.selection import evaluate_incumbent, locate_eval_inputs, locate_incumbent, select_and_promote
from steps.vlm import evaluate_model, locate_vlm_inputs, merge_model, train_lora, train_token_mining


@pipeline
def select_vision_weights(config: SelectionConfig):
    nested = {"experiment_tracker.mlflow": {"experiment_name": config.experiment_name, "nested": True}}
    eval_inputs = locate_eval_inputs(config.evaluation, config.contracts_dir, config.output_dir)
    models, metrics, answers, stage1_runs = [], [], [], {}
    for name, seed in config.runs():  # one training per candidate, or per (candidate, seed) with `seeds:`
        key = config.run_key(name, seed)
        stage1, stage2 = config.candidate_configs(name, seed)
        owner = config.run_key(config.stage1_owner(name, seed), seed)  # candidates with equal stage-1 settings share it
        if owner not in stage1_runs:
            inputs1 = locate_vlm_inputs(stage1, id=f"locate_stage1_{owner}")
            stage1_runs[owner] = train_token_mining.with_options(settings=nested)(stage1, inputs1,
                                                                                  id=f"stage1_{owner}")[2]
        run1 = stage1_runs[owner]
        inputs2 = locate_vlm_inputs(stage2, with_init=False, id=f"locate_stage2_{key}")
        _, run2 = train_lora.with_options(settings=nested)(stage2, inputs2, run1, id=f"stage2_{key}")
        model = merge_model.with_options(settings=nested)(run2, config.merged_dir(name, seed), config.evaluation.prompt,
                                                          config.generation, id=f"merge_{key}")
        m, a = evaluate_model.with_options(settings=nested)(config.evaluation, key, model, eval_inputs,
                                                            id=f"evaluate_{key}")
        models.append(model)
        metrics.append(m)
        answers.append(a)
    incumbent = locate_incumbent(config.registry)
    inc_metrics, inc_answers = evaluate_incumbent.with_options(settings=nested)(
        config.evaluation, incumbent, eval_inputs, f"{config.output_dir}/incumbent")
    select_and_promote(config, models, metrics, answers, incumbent, inc_metrics, inc_answers)
