"""Training: config loading, optimizer and schedule, the trainer, and the dry-run summary.

Entry point: `python -m ultramem.train --config NAME_OR_PATH [--dry-run] [--section.key=value ...]`
(also under `torchrun`).
"""

from .config import TrainConfig, load_config, packaged_config_names

__all__ = ["TrainConfig", "load_config", "packaged_config_names"]
