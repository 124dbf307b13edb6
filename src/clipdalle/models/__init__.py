"""The models, each file read top to bottom like its paper: the discrete VAE (`dvae`), the DALL·E transformer
(`dalle`, with its decoding fast paths in `decoding`), CLIP (`clip`) and a captioner (`captioner`, DALL·E's stream
reversed), on the shared blocks in `layers`.

`MODEL_CLASSES` maps the `model_type` a run directory records to its class (clipdalle.checkpoint dispatches on it).
"""

from .captioner import Captioner, CaptionerConfig
from .clip import CLIP, CLIPConfig
from .dalle import DALLE, DALLEConfig
from .dvae import DiscreteVAE, DVAEConfig

MODEL_CLASSES = {cls.model_type: cls for cls in (DiscreteVAE, CLIP, DALLE, Captioner)}

__all__ = [
    "CLIP",
    "DALLE",
    "Captioner",
    "CaptionerConfig",
    "MODEL_CLASSES",
    "CLIPConfig",
    "DALLEConfig",
    "DVAEConfig",
    "DiscreteVAE",
]
