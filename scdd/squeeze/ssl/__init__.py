"""Self-supervised backbones: built-in pretraining (by registered name) and checkpoint import."""

from scdd.squeeze.ssl import moco  # noqa: F401  (register the methods)
from scdd.squeeze.ssl.checkpoints import FORMATS, detect_format, import_backbone
from scdd.squeeze.ssl.registry import SSL_METHODS, register_ssl

__all__ = ["FORMATS", "SSL_METHODS", "detect_format", "import_backbone", "register_ssl"]
