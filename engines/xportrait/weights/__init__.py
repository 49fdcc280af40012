"""X-Portrait's weights, apart from the model (as diffusers keeps its loaders apart).

- keymap.py: the released checkpoint's tensor names <-> ours, both ways
- files.py: reading safetensors / torch files, hub ids only when allowed
- collect.py: the collector: every tensor mapped or deliberately ignored, every one of ours
  filled, every shape right, or an error naming the keys
- text.py: the empty prompt's CLIP embedding (the only text the model sees)
- lora.py: fusing a LoRA (LCM-LoRA) into the UNet
- load.py: `load_model`, the one entry, and `random_model`
- released.py: `to_released`, our tensors under the released names (exporting weights)
"""

from .errors import WeightsError
from .files import read_state_dict
from .keymap import ddpm_schedule, key_map, sd15_alphas_cumprod
from .load import load_model, map_released, random_model
from .lora import fuse_lora
from .released import to_released, write_released

__all__ = ["WeightsError", "load_model", "random_model", "read_state_dict", "map_released", "fuse_lora",
           "sd15_alphas_cumprod", "ddpm_schedule", "key_map", "to_released", "write_released"]
