"""A jaxpt extension as a user writes one, outside the package: a task
(``jaxpt_ext_demo.smoothed_sft``) and a model family (``jaxpt_ext_demo.tiny_gelu``), each
registered when its module is imported. A run imports them through its config's
``imports`` key (see ``../smoothed_sft.yaml`` and ``../tiny_gelu.yaml``)."""
