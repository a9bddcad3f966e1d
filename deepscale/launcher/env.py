"""The environment exported to every rank on every node.

Two sources, later ones winning: variables of the caller whose names start with one of
``EXPORT_ENV_PREFIXES`` (NCCL_, PYTHON, CUDA_, OMP_, ...), then the variables named in
``.deepscale_env`` files: ``$HOME/.deepscale_env``, ``./.deepscale_env`` and the file named
by ``$DEEPSCALE_ENV_FILE``. ``.deepspeed_env`` is read too, for users switching over.
A line is ``NAME=VALUE`` or a bare ``NAME`` (meaning: export the caller's value).
"""
import collections
import os
import re
from typing import Dict, List, Mapping, Optional

from deepscale.launcher.constants import ENV_FILE_NAMES, ENV_FILE_VAR, EXPORT_ENV_EXCLUDE, EXPORT_ENV_PREFIXES

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_env_file(path: str, environ: Mapping[str, str]) -> "collections.OrderedDict[str, str]":
    """Parse one env file.

    Args:
        path: the file.
        environ: where bare ``NAME`` lines take their value (unset names are skipped).

    Raises:
        ValueError: naming the file and line of an invalid line.
    """
    values = collections.OrderedDict()
    with open(path, "r", encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    for line_no, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].strip()
        name, sep, value = line.partition("=")
        name = name.strip()
        if not _NAME_RE.match(name):
            raise ValueError(f"env file {path} line {line_no}: expected NAME=VALUE or NAME, got {raw.strip()!r}")
        if sep:
            values[name] = value
        elif name in environ:
            values[name] = environ[name]
    return values


def env_file_paths(environ: Mapping[str, str], cwd: str, home: Optional[str]) -> List[str]:
    """Existing env files in increasing precedence: ``$HOME``, the working directory, ``$DEEPSCALE_ENV_FILE``."""
    candidates = []
    for folder in ([home] if home else []) + [cwd]:
        for name in ENV_FILE_NAMES:
            candidates.append(os.path.join(folder, name))
    paths = []
    for path in candidates:
        real = os.path.realpath(path)
        if os.path.isfile(path) and real not in [os.path.realpath(p) for p in paths]:
            paths.append(path)
    explicit = environ.get(ENV_FILE_VAR)
    if explicit:
        if not os.path.isfile(explicit):
            raise ValueError(f"{ENV_FILE_VAR}={explicit!r} does not name an existing file")
        paths.append(explicit)
    return paths


def collect_exports(environ: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None,
                    home: Optional[str] = None) -> Dict[str, str]:
    """The ordered ``name -> value`` mapping to export to all ranks.

    Args:
        environ: the caller's environment. Default ``os.environ``.
        cwd: the working directory searched for env files. Default ``os.getcwd()``.
        home: the home directory searched for env files. Default ``$HOME``.
    """
    environ = os.environ if environ is None else environ
    cwd = os.getcwd() if cwd is None else cwd
    home = environ.get("HOME") if home is None else home
    exports = collections.OrderedDict()
    for name in sorted(environ):
        if name.startswith(EXPORT_ENV_PREFIXES) and name not in EXPORT_ENV_EXCLUDE:
            exports[name] = environ[name]
    for path in env_file_paths(environ, cwd, home):
        exports.update(parse_env_file(path, environ))
    return exports
