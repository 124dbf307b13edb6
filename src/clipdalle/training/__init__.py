"""Training: the one loop (`loop.train`), what each model optimises (`objectives`), how each model is trained from a
dataset (`recipes`), and the dVAE token cache DALL·E trains on (`codes`)."""

from .recipes import train_captioner, train_clip, train_dalle, train_vae

__all__ = ["train_captioner", "train_clip", "train_dalle", "train_vae"]
