"""Robustness evaluation of every model of the toolkit: white-box attacks (FGSM, PGD Linf/L2, AutoAttack) through
every gradient source of an EBM (BPTT, implicit differentiation, transfer from its student), the Square black-box
attack, natural corruptions (distill.corruptions), and an audit for gradient masking.

    from distill.robustness import RobustnessConfig, load_model_under_test, evaluate
    models = [load_model_under_test("net.h5", "EBM", student="student.h5"), load_model_under_test("pgd.h5")]
    results = evaluate(models, data.x_test, data.y_test, (1, 28, 28), RobustnessConfig.for_dataset(data.name),
                       "runs/robustness", dataset=data.name)
"""
from .attacks import ATTACKS, AttackSpec, craft
from .config import DATASET_BUDGETS, RobustnessConfig
from .evaluate import evaluate
from .implicit import ImplicitEBM
from .models import Deployment, EBMUnderTest, FeedForwardUnderTest, load_model_under_test

__all__ = ["ATTACKS", "AttackSpec", "craft", "DATASET_BUDGETS", "RobustnessConfig", "evaluate", "ImplicitEBM",
           "Deployment", "EBMUnderTest", "FeedForwardUnderTest", "load_model_under_test"]
