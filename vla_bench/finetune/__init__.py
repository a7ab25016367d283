"""Fine-tuning: training data (data.py: sources -> trajectories of training targets, no-op filter, gripper
convention, subsampling) and norm stats (stats.py: dataset_statistics.json)."""
from .data import (NOOP_THRESHOLD, SOURCE_KINDS, TrainingData, Trajectory, aggregate_steps, execution_rule,
                   libero_gripper_to_training, load_training_data, noop_mask)
from .stats import compute_norm_stats, dataset_statistics, write_dataset_statistics

__all__ = ["NOOP_THRESHOLD", "SOURCE_KINDS", "TrainingData", "Trajectory", "aggregate_steps", "compute_norm_stats",
           "dataset_statistics", "execution_rule", "libero_gripper_to_training", "load_training_data", "noop_mask",
           "write_dataset_statistics"]
