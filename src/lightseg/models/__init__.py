"""Model zoo. Importing this package registers every model (one import per model module)."""

from lightseg.models.registry import check_input_size, create_model, list_models, model_entry, register_model
from lightseg.models import pspseg  # noqa: F401  (registers "pspseg")

__all__ = ["check_input_size", "create_model", "list_models", "model_entry", "register_model"]
