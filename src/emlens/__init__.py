"""emlens: the mechanistic study of emergent misalignment, from fine-tuning to steering.

The front door for notebooks and scripts:

    import emlens as em
    model = em.load_model("smollm2-135m-instruct")
    acts = em.activations(model, prompts, sites="resid_post", position="last_prompt")  # keyed by site name
    refusal = em.fit_direction(acts, labels, groups=prompt_ids, method="diff_of_means")  # in memory
    with em.steer(model, refusal.add(layer=15, scale=2.0)):          # the engine's masks: never padding
        print(em.generate(model, "Give me a recipe for pancakes."))
    table = em.evaluate(model, settings=["refusal"], interventions=[refusal.ablate()])
    em.compare(refusal, em.load("artifacts/directions/refusal-insecure"))

Names are imported on first use, so `import emlens` and the CLI start fast.
"""

from __future__ import annotations

import importlib

from emlens.base.version import __version__  # noqa: F401  (re-exported)

_FRONT_DOOR = {
    # models and sites
    "load_model": "emlens.model", "Model": "emlens.model", "list_models": "emlens.model",
    "site_name": "emlens.sites", "resolve_sites": "emlens.sites", "SITE_KINDS": "emlens.sites",
    # data
    "load_questions": "emlens.data.questions", "read_questions": "emlens.data.questions",
    "load_chat_jsonl": "emlens.data.chat", "NUDGES": "emlens.data.nudges", "apply_nudge": "emlens.data.nudges",
    # generation
    "generate": ("emlens.generation.engine", "generate_text"), "GenerationConfig": "emlens.generation.engine",
    "Request": "emlens.generation.engine", "rate": "emlens.generation.distributions",
    # activations
    "activations": "emlens.capture.extract", "Activations": "emlens.capture.extract",
    "ExtractItem": "emlens.capture.items", "extract_to_store": "emlens.capture.extract",
    "ActivationStore": "emlens.capture.store",
    # steering
    "steer": "emlens.steering.interventions", "AddVector": "emlens.steering.interventions",
    "Ablate": "emlens.steering.interventions", "Clamp": "emlens.steering.interventions", "compose": "emlens.steering.interventions",
    "random_like": "emlens.steering.interventions", "ablate_adapter_weights": "emlens.steering.weights",
    # judges
    "make_judge": "emlens.judges",
    # directions
    "fit_direction": "emlens.directions.fit", "Direction": "emlens.directions.artifact",
    "LinearProbe": "emlens.directions.artifact", "RegressionProbe": "emlens.directions.artifact",
    "fit_probe": "emlens.directions.probe",
    "direction_tokens": "emlens.directions.lens", "residual_lens": "emlens.directions.lens",  # the logit lens
    "export_direction": "emlens.directions.export",  # llama.cpp control vector, repeng, steering-vectors, Neuronpedia
    # evaluation
    "evaluate": "emlens.evaluation.run", "EvalConfig": "emlens.evaluation.config",
    "summarize": "emlens.evaluation.summary", "read_samples": "emlens.runs",
    # honesty under pressure (MASK-style) and the deception rate
    "honesty": "emlens.evaluation.honesty", "HonestyConfig": "emlens.evaluation.honesty",
    "read_propositions": "emlens.data.propositions", "read_mask_csv": "emlens.data.propositions",
    # capability checks: MC accuracy by option log-likelihood, GSM8K exact match
    "capability": "emlens.evaluation.capability", "CapabilityConfig": "emlens.evaluation.capability_tasks",
    "read_mc_questions": "emlens.data.capability",
    # sparse autoencoders (sae-lens)
    "load_sae": "emlens.sae.artifact", "SAETrainConfig": "emlens.sae.train", "train_sae": "emlens.sae.train",
    "evaluate_sae": "emlens.sae.quality", "decompose_direction": "emlens.sae.decompose",
    "diff_models": "emlens.sae.diff", "AblateLatent": "emlens.sae.steer",
    "explain_latents": "emlens.sae.explain",  # autointerp: explanations scored by detection and fuzzing
    # analysis
    "compare": "emlens.analysis.compare", "compare_models": "emlens.analysis.compare", "monitor": "emlens.analysis.monitor",
    "run_steer": "emlens.study.steer", "dose_response_table": "emlens.analysis.dose_response",
    "patch": "emlens.analysis.patching", "PatchItem": "emlens.analysis.patching",  # activation patching
    "diff": "emlens.study.diff",  # model diffing with controls (`emlens diff`)
    "attribute": "emlens.analysis.patching", "patch_agreement": ("emlens.analysis.patching", "agreement"),
    "token_heatmap": ("emlens.analysis.token_heatmap", "run_token_heatmap"),  # `emlens tokens`
    "direction_card": "emlens.analysis.card",  # `emlens card`
    "token_projections": "emlens.analysis.token_heatmap",  # the heat-map's token table, in memory
    # steered models behind an OpenAI-compatible API (`emlens serve`; `em.serve` would be the subpackage)
    "serve_model": "emlens.serve.app", "load_server": "emlens.serve.server", "ServeConfig": "emlens.serve.config",
    # training
    "TrainConfig": "emlens.training.config", "train": "emlens.training.trainer",
    "train_sweep": "emlens.study.sweep",
    # the biased-user interaction loop (`emlens loop`)
    "run_loop": "emlens.study.loop", "LoopConfig": "emlens.study.loop_config",
    # the whole study (`emlens run`)
    "run_experiment": "emlens.study", "plan_experiment": "emlens.study",
    # honesty, free-form EM and capability against the mixture ratio (`emlens mixture-study`)
    "run_mixture_study": "emlens.study.mixture", "MixtureStudyConfig": "emlens.study.mixture",
    # any artifact folder, by the kind in its cfg.json
    "load": ("emlens.base.io", "load_artifact"),
}
__all__ = sorted(_FRONT_DOOR)


def _import(name: str):
    target = _FRONT_DOOR[name]
    module, attribute = (target, name) if isinstance(target, str) else target
    return getattr(importlib.import_module(module), attribute)


def __getattr__(name: str):
    if name not in _FRONT_DOOR:
        raise AttributeError(f"module 'emlens' has no attribute {name!r}")
    value = _import(name)
    if name == "load":  # every artifact kind registers its loader when its module is imported
        _import_artifact_modules()
    globals()[name] = value
    return value


def _import_artifact_modules() -> None:
    """Every library module (not the CLI, benchmarks or the vLLM worker side): each registers the artifact kinds it
    writes, so `em.load` opens every kind without a list kept by hand."""
    import pkgutil

    for info in pkgutil.walk_packages(__path__, f"{__name__}."):
        if not any(part in info.name for part in (".cli", ".bench", "vllm", "__main__")):
            importlib.import_module(info.name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
