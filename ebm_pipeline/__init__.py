"""The whole study in one command (``ebm pipeline``): it composes the simulator (ebm_sim), the PyTorch side
(distill) and the neuromorphic mapping (hardware), which know nothing of each other beyond their public APIs.

    from ebm_pipeline import PipelineConfig, run_pipeline
    results = run_pipeline(PipelineConfig.for_dataset("digits"), "runs/pipeline")   # report: runs/pipeline/report.html
"""
from .config import PipelineConfig
from .run import STAGES, run_pipeline

__all__ = ["PipelineConfig", "STAGES", "run_pipeline"]
