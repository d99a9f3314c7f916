"""Ways of inferring (and learning θ against) the one model: ``vi``, ``iwae`` and ``hmc``."""
