"""vaebench: how good is my VAE inference, really?

One generative model p_θ(x|z)p(z), written once in Pyro -- a built-in or any model that follows the
contract of :mod:`vaebench.models.contract` -- learned and inferred several ways
(:class:`LatentModel`), and scored with the same log-likelihood estimators.
"""

__version__ = "0.2.0"

from vaebench.config import ModelConfig, TrainConfig
from vaebench.data import Dataset, load_dataset
from vaebench.errors import VaebenchError
from vaebench.model import VAE, LatentModel
from vaebench.models.contract import ModelContractError

__all__ = ["VAE", "Dataset", "LatentModel", "ModelConfig", "ModelContractError", "TrainConfig", "VaebenchError",
           "load_dataset", "__version__"]
