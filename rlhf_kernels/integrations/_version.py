"""The version guard of the integrations' patch(): each integration lists the framework
versions its drop-ins follow, and patch() replaces nothing when another is installed.

    from ._version import supported_version

    def patch():
        version = supported_version("openrlhf", "openrlhf", SUPPORTED_VERSIONS)
        if version is None:
            return 0          # warned: which version is installed, which are supported
        ...

A supported entry is an exact version ("0.11.2") or a prefix ending in ".*" ("1.16.*");
a local suffix of the installed version ("0.11.2+cu128") is ignored. The installed
version is read from the distribution's metadata (importlib.metadata), so checking it
imports nothing of the framework.
"""

from __future__ import annotations

import warnings
from importlib import metadata
from typing import Optional, Sequence


class UnsupportedVersionWarning(UserWarning):
    """patch() found a framework version its drop-ins do not follow, and patched nothing."""


def installed_version(distribution: str) -> Optional[str]:
    """The installed version of `distribution` (a pip name), or None when it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def is_supported(version: str, supported: Sequence[str]) -> bool:
    """Whether `version` matches an entry of `supported` (exact, or a "X.Y.*" prefix)."""
    public = version.split("+", 1)[0]
    for entry in supported:
        if entry.endswith(".*"):
            prefix = entry[:-2]
            if public == prefix or public.startswith(prefix + "."):
                return True
        elif public == entry:
            return True
    return False


def supported_version(integration: str, distribution: str, supported: Sequence[str]) -> Optional[str]:
    """The installed version of `distribution` when `supported` lists it; otherwise warns
    (UnsupportedVersionWarning, naming the installed and the supported versions) and
    returns None, and the caller patches nothing."""
    version = installed_version(distribution)
    listed = ", ".join(supported)
    if version is None:
        message = f"{distribution} is not installed"
    elif not is_supported(version, supported):
        message = f"{distribution} {version} is installed"
    else:
        return version
    warnings.warn(
        f"rlhf_kernels.integrations.{integration}.patch(): {message}; its drop-ins follow {distribution} "
        f"{listed}. Nothing was patched.",
        UnsupportedVersionWarning,
        stacklevel=3,
    )
    return None
