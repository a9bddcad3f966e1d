"""Atomic checkpoint directories.

Note: crash safety. A checkpoint tag is first written into a hidden sibling directory
(``.tmp-<tag>-<id>``); every file is fsynced; only then is the directory renamed to its final
name, and only after that does the ``latest`` file (itself replaced with an atomic rename)
point at it. A crash at any moment therefore leaves either the old or the new checkpoint
complete, never a half-written one under a name that a loader would pick. When an existing
tag is overwritten, the old directory is first renamed aside to ``.old-<tag>-<id>``;
:func:`resolve_tag_dir` falls back to it if a crash hit between the two renames.

Leftovers of a crashed or failed save (staging directories, half-written ``latest`` files,
directories set aside) are tidied by :func:`remove_stale_staging` at the start of the next
save and load. That assumes one job writes a checkpoint root at a time (the job's saves are
sequential), which is also what makes ``latest`` meaningful.
"""
import os
import shutil
import uuid
from typing import Optional

LATEST_FILE = "latest"
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """fsync every file under ``path`` and the directories themselves."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(root)


def write_latest_tag(save_dir: str, tag: str, filename: str = LATEST_FILE) -> None:
    """Point ``save_dir/filename`` (default ``latest``) at ``tag`` with an atomic replace."""
    tmp = os.path.join(save_dir, f"{_TMP_PREFIX}{filename}-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as handle:
        handle.write(tag)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, os.path.join(save_dir, filename))
    _fsync_dir(save_dir)


def read_latest_tag(load_dir: str, filename: str = LATEST_FILE) -> Optional[str]:
    """The tag named by ``load_dir/filename`` (default ``latest``), or None if there is no such file."""
    path = os.path.join(load_dir, filename)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        tag = handle.read().strip()
    return tag or None


def resolve_tag_dir(load_dir: str, tag: str) -> Optional[str]:
    """The directory of ``tag``, recovering one left aside by an interrupted overwrite."""
    final = os.path.join(load_dir, tag)
    if os.path.isdir(final):
        return final
    prefix = f"{_OLD_PREFIX}{tag}-"
    for name in sorted(os.listdir(load_dir)) if os.path.isdir(load_dir) else []:
        if name.startswith(prefix):
            return os.path.join(load_dir, name)
    return None


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def remove_stale_staging(save_dir: str, restore_set_aside: bool = True) -> list:
    """Tidy the leftovers of crashed or failed saves in ``save_dir``; returns the names handled.

    Staging directories and temporary ``latest`` files are deleted (``latest`` never names
    them). With ``restore_set_aside`` (default True), a tag directory set aside by an
    interrupted overwrite is deleted when its tag was published afterwards, and renamed back
    to its tag otherwise (it is then the only copy). Loads pass False: other ranks may be
    resolving that directory at the same moment. Call it from one rank, when no save into
    ``save_dir`` is in progress.
    """
    if not os.path.isdir(save_dir):
        return []
    handled = []
    for name in sorted(os.listdir(save_dir)):
        path = os.path.join(save_dir, name)
        if name.startswith(_TMP_PREFIX):
            _remove(path)
        elif restore_set_aside and name.startswith(_OLD_PREFIX) and os.path.isdir(path):
            tag = name[len(_OLD_PREFIX):].rsplit("-", 1)[0]
            final = os.path.join(save_dir, tag)
            if os.path.isdir(final):
                _remove(path)
            else:
                os.rename(path, final)
        else:
            continue
        handled.append(name)
    if handled:
        _fsync_dir(save_dir)
    return handled


class AtomicCheckpointDir:
    """Stages a checkpoint tag in a temporary directory and publishes it atomically.

    Use from one process (rank 0) for ``create()``/``commit()``; every rank may write files
    into ``staging_path`` in between (the engine puts barriers around that).

    Args:
        save_dir: the checkpoint root.
        tag: the checkpoint name (a sub-directory of ``save_dir``).
        staging_id: shared suffix so all ranks agree on the staging path.
    """

    def __init__(self, save_dir: str, tag: str, staging_id: str):
        if not tag or os.sep in tag or tag in (".", "..") or tag.startswith("."):
            raise ValueError(f"checkpoint tag {tag!r} must be a plain directory name (no '/', not hidden)")
        self.save_dir = save_dir
        self.tag = tag
        self.final_path = os.path.join(save_dir, tag)
        self.staging_path = os.path.join(save_dir, f"{_TMP_PREFIX}{tag}-{staging_id}")

    def create(self) -> None:
        os.makedirs(self.save_dir, exist_ok=True)
        remove_stale_staging(self.save_dir)
        os.makedirs(self.staging_path)

    def commit(self, update_latest: bool = True) -> str:
        """Publish the staged directory under its final name; returns the final path."""
        fsync_tree(self.staging_path)
        aside = None
        if os.path.exists(self.final_path):
            aside = os.path.join(self.save_dir, f"{_OLD_PREFIX}{self.tag}-{uuid.uuid4().hex[:8]}")
            os.rename(self.final_path, aside)
        try:
            os.rename(self.staging_path, self.final_path)
        except BaseException:
            if aside is not None:  # put the previous copy of the tag back under its name
                os.rename(aside, self.final_path)
            raise
        _fsync_dir(self.save_dir)
        if update_latest:
            write_latest_tag(self.save_dir, self.tag)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        return self.final_path

    def abort(self) -> None:
        shutil.rmtree(self.staging_path, ignore_errors=True)
