"""The runner: one training loop for every method, evaluation, checkpoints and run directories."""
from .evaluate import evaluate
from .loop import LoopState, build_optimizer, build_scheduler, fit, seed_everything
from .run import evaluate_run, run_experiment

__all__ = ["LoopState", "build_optimizer", "build_scheduler", "evaluate", "evaluate_run", "fit",
           "run_experiment", "seed_everything"]
