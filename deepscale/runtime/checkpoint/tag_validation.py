"""``checkpoint.tag_validation``: check that every rank saves under the same tag.

A tag that differs across ranks (for example built from a rank-local counter or a timestamp)
splits one checkpoint over several directories that no load can reassemble. Before writing,
the ranks exchange their tags: ``"WARN"`` logs the disagreement, ``"FAIL"`` raises, ``"IGNORE"``
skips the exchange (DeepSpeed's modes and default, ``"WARN"``).
"""
from deepscale import comm as dist
from deepscale.utils.logging import logger

VALID_MODES = ("WARN", "IGNORE", "FAIL")


def validate_checkpoint_tag(tag: str, mode: str = "WARN") -> bool:
    """Return True when every rank passed the same ``tag`` (always True for ``"IGNORE"`` or one rank).

    Args:
        tag: this rank's checkpoint tag.
        mode: ``"WARN"``, ``"IGNORE"`` or ``"FAIL"`` (any case). Default ``"WARN"``.

    Raises:
        ValueError: ``mode`` is unknown, or the tags differ and ``mode`` is ``"FAIL"``.
    """
    mode = str(mode).upper()
    if mode not in VALID_MODES:
        raise ValueError(f"checkpoint.tag_validation={mode!r}: allowed values are {', '.join(VALID_MODES)}")
    if mode == "IGNORE" or not dist.is_initialized() or dist.get_world_size() == 1:
        return True
    tags = [None] * dist.get_world_size()
    dist.all_gather_object(tags, str(tag))
    if len(set(tags)) == 1:
        return True
    by_tag = {}
    for rank, rank_tag in enumerate(tags):
        by_tag.setdefault(rank_tag, []).append(rank)
    message = ("save_checkpoint: ranks passed different tags: " +
               "; ".join(f"{t!r} on ranks {ranks}" for t, ranks in by_tag.items()) +
               " (checkpoint.tag_validation)")
    if mode == "FAIL":
        raise ValueError(message)
    logger.warning(message)
    return False
