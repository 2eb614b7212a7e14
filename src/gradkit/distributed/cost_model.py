"""Deprecated: the pipeline cost model moved to :mod:`gradkit.stages.cost_model`.

This alias stays for one release; import from ``gradkit.stages.cost_model`` (or ``gradkit.stages``).
``profile_block_costs`` is :func:`gradkit.stages.profile_blocks` now.
"""

import warnings

from gradkit.stages.cost_model import *  # noqa: F403
from gradkit.stages.cost_model import __all__  # noqa: F401

warnings.warn(
    "gradkit.distributed.cost_model moved to gradkit.stages.cost_model; this alias will be removed",
    DeprecationWarning,
    stacklevel=2,
)
