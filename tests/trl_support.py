"""Whether the installed TRL is one the drop-ins follow (rk_trl.SUPPORTED_VERSIONS; the
test extra pins it): another TRL makes patch() refuse, so its tests skip with this reason."""

import pytest

from rlhf_kernels.integrations import trl as rk_trl
from rlhf_kernels.integrations._version import installed_version, is_supported

try:
    import trl.trainer.utils as trl_utils
except ImportError:
    trl_utils = None

VERSION = installed_version("trl")
# None when the installed TRL is supported.
UNSUPPORTED = (
    "trl is not installed"
    if trl_utils is None
    else None
    if is_supported(VERSION, rk_trl.SUPPORTED_VERSIONS)
    else f"trl {VERSION} is installed; the drop-ins follow trl {', '.join(rk_trl.SUPPORTED_VERSIONS)} "
    "(patch() refuses others)"
)
needs_trl = pytest.mark.skipif(UNSUPPORTED is not None, reason=str(UNSUPPORTED))


def skip_module_unless_supported() -> None:
    if UNSUPPORTED is not None:
        pytest.skip(UNSUPPORTED, allow_module_level=True)
