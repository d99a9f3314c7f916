"""vaebench: how good is my VAE inference, really?

One generative model p_θ(x|z)p(z), written once in Pyro (:class:`VAE`), learned and inferred
several ways, and scored with the same log-likelihood estimators.
"""

__version__ = "0.1.0"

from vaebench.config import ModelConfig, TrainConfig
from vaebench.data import Dataset, load_dataset
from vaebench.errors import VaebenchError
from vaebench.model import VAE

__all__ = ["VAE", "Dataset", "ModelConfig", "TrainConfig", "VaebenchError", "load_dataset", "__version__"]
