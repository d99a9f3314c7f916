"""``vaebench compare``: learn the one model three ways, score every decoder the same way, on any executor.

The flow, one file each:

:mod:`~vaebench.compare.settings`  :class:`CompareConfig` and the presets;
:mod:`~vaebench.compare.plan`      the stages (kinds, keys, dependencies, costs) as data;
:mod:`~vaebench.compare.stages`    one plain function per stage kind, in one dict;
:mod:`~vaebench.compare.runner`    executors (local pool, Dask, Slurm), the lock, resume, progress.
"""

from vaebench.compare.plan import KINDS, Model, Stage, models, plan, stage_seed
from vaebench.compare.runner import EXECUTORS, CompareError, DaskExecutor, Outcome, run_compare
from vaebench.compare.settings import (AXES, KNOWN_GUIDES, KNOWN_METHODS, PRESETS, PUBLIC_PRESETS, CompareConfig,
                                       preset)

__all__ = ["AXES", "EXECUTORS", "KINDS", "KNOWN_GUIDES", "KNOWN_METHODS", "PRESETS", "PUBLIC_PRESETS",
           "CompareConfig", "CompareError", "DaskExecutor", "Model", "Outcome", "Stage", "models", "plan", "preset",
           "run_compare", "stage_seed"]
