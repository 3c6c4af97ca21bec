"""Models by registered name, and checkpoint I/O."""

from scdd.models import convnet, torchvision_models, wide_resnet  # noqa: F401  (register the builders)
from scdd.models.checkpoint import checkpoint_bytes, load_weights, model_from_checkpoint
from scdd.models.ensemble import Ensemble, members_of, model_metadata
from scdd.models.heads import head_path, set_head, strip_head
from scdd.models.registry import MODELS, create_model

__all__ = ["MODELS", "Ensemble", "checkpoint_bytes", "create_model", "head_path", "load_weights", "members_of",
           "model_from_checkpoint", "model_metadata", "set_head", "strip_head"]
