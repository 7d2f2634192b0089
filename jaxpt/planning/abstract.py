"""A run's train state and batch as sharded ``ShapeDtypeStruct``s: ``jaxpt.run_spec``
describes them for training, plans and benchmarks alike; its names stay importable here."""

from jaxpt.planning.memory import bytes_per_device
from jaxpt.run_spec import AbstractRun, abstract_batch, abstract_model, abstract_run
from jaxpt.tasks.common import hf_config_dict

__all__ = [
    "AbstractRun", "abstract_batch", "abstract_model", "abstract_run", "bytes_per_device",
    "hf_config_dict",
]
