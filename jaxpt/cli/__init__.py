"""Command-line entry points, one module per command, each with ``main(argv=None) -> int``.

They parse arguments, call the library and format its output; nothing else lives here.
``python -m jaxpt.train`` (and ``jaxpt.generate``, ``jaxpt.eval``, ``jaxpt.bench``,
``jaxpt.quickstart``, ``jaxpt.convert``) and the ``jaxpt-*`` console scripts both land in
these functions. Each module also offers ``build_parser()`` and ``parse_args(argv)``, which
build and apply its argument parser without running anything (the docs' commands are
checked with them).

Every ``main`` is wrapped in ``command``: a user error (a bad path, a missing optional
package, a bad config, a broken reward function; ``USER_ERRORS``) prints one
``error: ...`` line on stderr and exits with status 1 instead of a traceback. Anything
else is a bug and keeps its traceback; ``JAXPT_DEBUG=1`` shows the traceback of user
errors too.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable

# (module, class) of the errors a user causes and can fix; looked up in sys.modules, so
# checking an error never imports anything (an unloaded module raised nothing).
USER_ERRORS = (
    ("jaxpt.config", "ConfigError"),
    ("jaxpt.data.sources", "DataError"),
    ("jaxpt.evals.tasks", "TaskConfigError"),
    ("jaxpt.judges.templates", "TemplateError"),
    ("jaxpt.planning.topology", "TopologyError"),
    ("jaxpt.models.config", "UnsupportedArchitectureError"),
    ("jaxpt.models.peft_io", "AdapterError"),
    ("jaxpt.checkpoint", "CheckpointError"),
    ("jaxpt.loop", "NonFiniteError"),
    ("jaxpt.rewards.runner", "RewardError"),
    ("jaxpt.judges.endpoint", "EndpointError"),
    ("huggingface_hub.errors", "HFValidationError"),  # a model path that is no hub name
)


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is the user's to fix (see the module docstring), not a bug.

    ``OSError`` covers missing files, bad paths and unreachable hub names. An
    ``ImportError`` is a missing optional package unless what failed to import is jaxpt's
    own (a bug)."""
    if isinstance(error, ImportError):
        return (error.name or "").split(".")[0] != "jaxpt"
    if isinstance(error, OSError):
        return True
    for module_name, class_name in USER_ERRORS:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if cls is not None and isinstance(error, cls):
            return True
    return False


def command(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a CLI ``main``: user errors become ``error: ...`` on stderr and status 1."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except Exception as error:
            if not is_user_error(error) or os.environ.get("JAXPT_DEBUG", "") not in ("", "0"):
                raise
            print(f"error: {error}", file=sys.stderr, flush=True)
            return 1

    return wrapped
