"""Robustness evaluation of every model of the toolkit: white-box attacks (FGSM, PGD Linf/L2, AutoAttack) through
every gradient source of an EBM (BPTT, implicit differentiation, transfer from its student), the Square black-box
attack, natural corruptions (distill.corruptions), and an audit for gradient masking.

    from distill.robustness import RobustnessConfig, load_model_under_test, evaluate
    models = [load_model_under_test("net.h5", "EBM", student="student.h5"), load_model_under_test("pgd.h5")]
    results = evaluate(models, data.x_test, data.y_test, (1, 28, 28), RobustnessConfig.for_dataset(data.name),
                       "runs/robustness", dataset=data.name)

Names are imported lazily (torch loads only when an attack or model is used, not for ``ebm --help``).
"""
import importlib

_EXPORTS = {"ATTACKS": "attacks", "AttackSpec": "attacks", "craft": "attacks",
            "DATASET_BUDGETS": "config", "RobustnessConfig": "config", "SIDE_SOURCES": "config",
            "evaluate": "evaluation",
            "ImplicitEBM": "implicit", "Deployment": "models", "EBMUnderTest": "models",
            "FeedForwardUnderTest": "models", "ModuleUnderTest": "models", "load_model_under_test": "models",
            "run_audit": "audit", "write_report": "report", "markdown_table": "report"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
