"""Hostfile parsing and node/slot selection (``--include``, ``--exclude``, ``--num_nodes``, ``--num_gpus``).

A hostfile has one node per line, ``hostname slots=N``; ``#`` starts a comment and blank
lines are ignored. A *resource pool* is an ordered mapping ``host -> number of slots``; the
selection functions turn it into the *active resources*, ``host -> list of slot ids``,
keeping the hostfile's order (the first host is node 0 and holds rank 0).
"""
import collections
import os
import re
from typing import Dict, List, Optional

_HOST_RE = re.compile(r"^[A-Za-z0-9_.:\[\]-]+$")


def parse_hostfile_text(text: str, source: str = "<hostfile>") -> "collections.OrderedDict[str, int]":
    """Parse hostfile contents into an ordered ``host -> slots`` mapping.

    Args:
        text: the file contents.
        source: the file name used in error messages. Default ``"<hostfile>"``.

    Raises:
        ValueError: naming the file and line number of a malformed or duplicate line.
    """
    pool = collections.OrderedDict()
    for line_no, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        where = f"hostfile {source} line {line_no}"
        if len(fields) != 2 or not fields[1].startswith("slots="):
            raise ValueError(f"{where}: expected 'hostname slots=N', got {raw.strip()!r}")
        host, slots_text = fields[0], fields[1][len("slots="):]
        if not _HOST_RE.match(host):
            raise ValueError(f"{where}: {host!r} is not a valid hostname")
        if not slots_text.isdigit() or int(slots_text) < 1:
            raise ValueError(f"{where}: slots must be a positive integer, got {slots_text!r}")
        if host in pool:
            raise ValueError(f"{where}: host {host!r} is listed twice")
        pool[host] = int(slots_text)
    if not pool:
        raise ValueError(f"hostfile {source} names no hosts (expected lines 'hostname slots=N')")
    return pool


def read_hostfile(path: str) -> "collections.OrderedDict[str, int]":
    """Read and parse the hostfile at ``path`` (see :func:`parse_hostfile_text`).

    Raises:
        ValueError: the file is missing, unreadable or malformed.
    """
    if not os.path.isfile(path):
        raise ValueError(f"--hostfile {path!r} does not exist or is not a file")
    try:
        with open(path, "r", encoding="utf-8") as handle:
            text = handle.read()
    except OSError as err:
        raise ValueError(f"--hostfile {path!r} cannot be read: {err}") from err
    return parse_hostfile_text(text, source=path)


def parse_host_slots(spec: str, flag: str) -> "collections.OrderedDict[str, Optional[List[int]]]":
    """Parse ``host1:0,2@host2`` into ``{"host1": [0, 2], "host2": None}`` (None: all slots).

    Args:
        spec: the ``--include``/``--exclude`` value.
        flag: the flag name for error messages.
    """
    parsed = collections.OrderedDict()
    for part in spec.split("@"):
        part = part.strip()
        if not part:
            raise ValueError(f"{flag} {spec!r}: empty host entry; expected 'host1:0,2@host2'")
        host, sep, slot_text = part.partition(":")
        if host in parsed:
            raise ValueError(f"{flag} {spec!r}: host {host!r} appears twice")
        if not sep:
            parsed[host] = None
            continue
        try:
            slots = [int(s) for s in slot_text.split(",")]
        except ValueError:
            raise ValueError(f"{flag} {spec!r}: slots of {host!r} must be comma-separated integers, "
                             f"got {slot_text!r}") from None
        if any(s < 0 for s in slots) or len(set(slots)) != len(slots):
            raise ValueError(f"{flag} {spec!r}: slots of {host!r} must be distinct non-negative integers")
        parsed[host] = sorted(slots)
    return parsed


def _check_known(pool, hosts, flag):
    for host, slots in hosts.items():
        if host not in pool:
            raise ValueError(f"{flag}: unknown host {host!r}; known hosts: {', '.join(pool)}")
        if slots is not None and slots and max(slots) >= pool[host]:
            raise ValueError(f"{flag}: host {host!r} has {pool[host]} slot(s) (0..{pool[host] - 1}) "
                             f"but slot {max(slots)} was requested")


def filter_resources(pool: Dict[str, int], include: str = "", exclude: str = "") -> Dict[str, List[int]]:
    """Apply ``--include``/``--exclude`` to a resource pool.

    Args:
        pool: ordered ``host -> slots``.
        include: ``host1:0,2@host2``; only these hosts/slots are used. Default ``""`` (all).
        exclude: same syntax; these hosts/slots are removed. Default ``""`` (none).

    Returns:
        ordered ``host -> list of slot ids``; hosts left with no slot are dropped.
    """
    if include and exclude:
        raise ValueError("--include and --exclude cannot be used together")
    active = collections.OrderedDict((host, list(range(n))) for host, n in pool.items())
    if include:
        wanted = parse_host_slots(include, "--include")
        _check_known(pool, wanted, "--include")
        active = collections.OrderedDict(
            (host, slots if wanted[host] is None else wanted[host])
            for host, slots in active.items() if host in wanted)
    elif exclude:
        unwanted = parse_host_slots(exclude, "--exclude")
        _check_known(pool, unwanted, "--exclude")
        for host, slots in unwanted.items():
            if slots is None:
                del active[host]
            else:
                active[host] = [s for s in active[host] if s not in slots]
        active = collections.OrderedDict((h, s) for h, s in active.items() if s)
    if not active:
        raise ValueError("no hosts or slots are left after --include/--exclude")
    return active


def limit_resources(active: Dict[str, List[int]], num_nodes: int = -1, num_slots: int = -1) -> Dict[str, List[int]]:
    """Keep the first ``num_nodes`` hosts and the first ``num_slots`` slots of each.

    Args:
        active: ordered ``host -> slot ids``.
        num_nodes: hosts to use; ``-1`` means all. Default ``-1``.
        num_slots: ranks per host (``--num_gpus``/``--num_procs``); ``-1`` means all. Default ``-1``.

    Raises:
        ValueError: more nodes or slots are requested than the hostfile provides.
    """
    hosts = list(active)
    if num_nodes > 0:
        if num_nodes > len(hosts):
            raise ValueError(f"--num_nodes {num_nodes} requested but only {len(hosts)} host(s) are "
                             f"available: {', '.join(hosts)}")
        hosts = hosts[:num_nodes]
    limited = collections.OrderedDict()
    for host in hosts:
        slots = active[host]
        if num_slots > 0:
            if num_slots > len(slots):
                raise ValueError(f"--num_gpus/--num_procs {num_slots} requested but host {host!r} has "
                                 f"only {len(slots)} slot(s)")
            slots = slots[:num_slots]
        limited[host] = list(slots)
    return limited
