"""stp: Spatio-Temporal Pruning for reinforcement learning of masked diffusion language models.

``stp.Trainer(config, reward_funcs=[...], train_dataset=...).train()`` trains on your own TRL-form reward functions
and data (README, "Your own task"); ``python -m stp.train`` is the command line."""

__version__ = "0.1.0"

__all__ = ["Trainer"]


def __getattr__(name: str):
    if name == "Trainer":  # imported on first use: `import stp` stays light
        from stp.api import Trainer

        return Trainer
    raise AttributeError(f"module 'stp' has no attribute {name!r}")
