"""Models as Pyro programs: the contract (:mod:`.contract`), the built-ins (:mod:`.builtin`), the
guides vaebench builds (:mod:`.guides`) and ``--model SPEC`` loading (:mod:`.loading`)."""

from vaebench.models.builtin import BUILTIN_MODELS
from vaebench.models.contract import LatentSpace, ModelContractError, inspect_model
from vaebench.models.guides import GUIDES
from vaebench.models.loading import parse_model_args, spec_digest

__all__ = ["BUILTIN_MODELS", "GUIDES", "LatentSpace", "ModelContractError", "inspect_model", "parse_model_args",
           "spec_digest"]
