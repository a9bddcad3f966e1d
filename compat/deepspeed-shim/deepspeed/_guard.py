"""Detect a real DeepSpeed next to the deepscale shim (used by setup.py and by deepspeed/__init__.py).

Loaded by file path, never as ``deepspeed._guard``: every ``deepspeed.*`` name is an alias of a
deepscale module once the shim is imported. Standard library only (the build runs isolated).
"""
import os
import site
import sysconfig

SHIM_VERSION_LABEL = "+deepscale"
_SHIM_MARKER = "install_alias("


def _metadata_version(dist_dir):
    for name in ("METADATA", "PKG-INFO"):
        path = os.path.join(dist_dir, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as handle:
                for line in handle:
                    if line.startswith("Version:"):
                        return line.split(":", 1)[1].strip()
                    if not line.strip():
                        break
    return None


def _is_shim_package(package_dir):
    init = os.path.join(package_dir, "__init__.py")
    try:
        with open(init, encoding="utf-8", errors="replace") as handle:
            return _SHIM_MARKER in handle.read()
    except OSError:
        return False


def find_real_deepspeed_installs(search_dirs=None, skip_package_dir=None):
    """Descriptions of real (non-shim) DeepSpeed installs found in ``search_dirs``.

    Args:
        search_dirs: directories to scan (site-packages, sys.path entries). Default: this
            interpreter's purelib/platlib and the user site.
        skip_package_dir: a ``deepspeed`` package directory to ignore (the shim itself).
    """
    if search_dirs is None:
        paths = sysconfig.get_paths()
        search_dirs = [paths.get("purelib"), paths.get("platlib")]
        try:
            search_dirs.append(site.getusersitepackages())
        except Exception:  # site may be restricted in isolated builds
            pass
    found, seen = [], set()
    for directory in search_dirs:
        if not directory or not os.path.isdir(directory):
            continue
        directory = os.path.realpath(directory)
        if directory in seen:
            continue
        seen.add(directory)
        for entry in sorted(os.listdir(directory)):
            full = os.path.join(directory, entry)
            lowered = entry.lower()
            if lowered.startswith("deepspeed-") and lowered.endswith((".dist-info", ".egg-info")):
                version = _metadata_version(full)
                if version is not None and SHIM_VERSION_LABEL not in version:
                    found.append(f"DeepSpeed {version} at {full}")
            elif entry == "deepspeed" and os.path.isfile(os.path.join(full, "__init__.py")):
                if skip_package_dir and os.path.realpath(full) == os.path.realpath(skip_package_dir):
                    continue
                if not _is_shim_package(full):
                    found.append(f"a deepspeed package at {full}")
    return found
