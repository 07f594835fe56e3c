"""Experiments: poison -> pretrain a clean twin and a backdoored model -> evaluate both -> report,
from one YAML config, cached and resumable stage by stage."""

from .cache import StageError, StaleCacheError
from .config import (
    AblationConfig,
    AcceptanceConfig,
    ConfigKeyError,
    ExperimentConfig,
    TriggerTarget,
    load_experiment_config,
)
from .runner import run_experiment

__all__ = [
    "AblationConfig",
    "AcceptanceConfig",
    "ConfigKeyError",
    "ExperimentConfig",
    "StageError",
    "StaleCacheError",
    "TriggerTarget",
    "load_experiment_config",
    "run_experiment",
]
