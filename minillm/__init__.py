"""minillm: teach an English-centric Llama a new language — continual pretraining, loss-masked SFT,
ORPO alignment and evaluation, in plain PyTorch."""
__version__ = "0.1.0"

from minillm.model import Llama, LlamaConfig  # noqa: E402,F401
