"""Version of the installed rapid-vmm package."""

import pbr.version

version_info = pbr.version.VersionInfo('rapid-vmm')


def version_string() -> str:
    """Return the release string, e.g. ``0.1.0``."""
    try:
        return version_info.version_string()
    except Exception:  # noqa: BLE001 - not installed (source tree only)
        return '0.0.0'
