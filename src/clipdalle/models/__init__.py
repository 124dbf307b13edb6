"""The models, each file read top to bottom like its paper: the discrete VAE (`dvae`), the DALL·E transformer
(`dalle`, with its decoding fast paths in `decoding`) and CLIP (`clip`), on the shared blocks in `layers`.

`MODEL_CLASSES` maps the `model_type` a run directory records to its class (clipdalle.checkpoint dispatches on it).
"""

from .clip import CLIP, CLIPConfig
from .dalle import DALLE, DALLEConfig
from .dvae import DiscreteVAE, DVAEConfig

MODEL_CLASSES = {cls.model_type: cls for cls in (DiscreteVAE, CLIP, DALLE)}

__all__ = ["CLIP", "DALLE", "MODEL_CLASSES", "CLIPConfig", "DALLEConfig", "DVAEConfig", "DiscreteVAE"]
