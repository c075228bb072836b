"""Model zoo. Importing this package registers every model (one import per model module)."""

from lightseg.models.registry import (
    check_input, check_input_size, create_model, first_output, list_models, model_entry, register_model,
)
from lightseg.models import pspseg  # noqa: F401  (registers "pspseg")
from lightseg.models import lunet  # noqa: F401  (registers "lunet", "unet")
from lightseg.models import plainunet  # noqa: F401  (registers "plainunet")
from lightseg.models import monai_zoo  # noqa: F401  (registers "monai_unet", "segresnet", "unetr", "swinunetr")
from lightseg.models import lightmedseg  # noqa: F401  (registers "lightmedseg")

__all__ = ["check_input", "check_input_size", "create_model", "first_output", "list_models", "model_entry", "register_model"]
