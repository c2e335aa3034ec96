"""Own a conversion's output directory from the check of ``--out`` to the atomic rename: :class:`OutputTransaction`.

A conversion writes every file into a hidden work directory beside ``out_dir`` (``.<name>.partial-XXXX``) and
renames it to ``out_dir`` only when every stage has finished, so a failed or interrupted run leaves nothing
half-written. Around that, :meth:`OutputTransaction.writing` holds the output's lock, checks ``out_dir`` again
under it (the check before the work only makes bad input fail early: another conversion may finish in between),
keeps the fine-tune checkpoint directory (``.<name>.partial-checkpoint``) for a ``--resume`` or deletes it, and
removes the parent directories it created when the run fails.

``--force`` replaces only an empty directory or a bundle this program wrote: one whose ``SHA256SUMS``
(:mod:`vitcompress.deploy.bundle`) lists every file in it. Anything else is refused and left untouched.

The lock is a :mod:`filelock` file named by ``out_dir``'s absolute path, in a private directory of this user
under the system's temporary directory: never beside ``out_dir``, so that a failed run leaves nothing in the
user's tree (not even the parents it created), and never deleted, because deleting a held lock file lets a
second process lock a new file of the same name while the first still holds the old one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from vitcompress.deploy.bundle import MODEL, PAGE, SUMS, read_checksums
from vitcompress.errors import ModelError, OutputError
from vitcompress.training import checkpoint

#: How many unlisted files a refusal names.
NAMED_FILES = 5
REPORT = "report.json"


def unlisted_files(directory: Path) -> tuple[list[str], bool]:
    """The files under ``directory`` (sorted POSIX paths relative to it) that its ``SHA256SUMS`` does not list —
    all of them when it has no readable ``SHA256SUMS`` — and whether it has one. A directory that cannot be read
    is an OutputError: what it holds is unknown."""
    try:
        listed, has_sums = {*read_checksums(directory), SUMS, PAGE}, True
    except ModelError:
        listed, has_sums = set(), False

    def unreadable(exc: OSError) -> None:
        raise OutputError(f"--out {directory}: cannot read {exc.filename} ({exc.strerror}): left as it is")

    found = []
    for root, dirs, files in os.walk(directory, onerror=unreadable):
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]  # not walked into: entries themselves
        for name in files + links:
            relative = Path(root, name).relative_to(directory).as_posix()
            if relative not in listed:
                found.append(relative)
    return sorted(found), has_sums


def is_bundle(directory: Path) -> bool:
    """Whether ``directory`` is a finished bundle this program wrote: its ``SHA256SUMS`` lists every file in it,
    ``report.json`` and ``model.onnx`` among them."""
    if not directory.is_dir():
        return False
    unlisted, has_sums = unlisted_files(directory)
    return has_sums and not unlisted and {REPORT, MODEL} <= set(read_checksums(directory))


def check_out_dir(out_dir: Path, force: bool) -> None:
    """``out_dir`` may be written: new, or (with ``force``) an empty directory or an earlier bundle whose
    ``SHA256SUMS`` lists every file in it — never the working directory or one of its parents."""
    if not out_dir.exists():
        return
    if not force:
        raise OutputError(f"output directory {out_dir} exists: pass --force to replace it")
    if not out_dir.is_dir():
        raise OutputError(f"output path {out_dir} exists and is not a directory")
    resolved, cwd = out_dir.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OutputError(f"--out {out_dir} is the working directory or one of its parents: --force never "
                          "replaces it; name a new directory")
    unlisted, has_sums = unlisted_files(out_dir)
    if unlisted:
        why = "not listed in its SHA256SUMS" if has_sums else "it has no readable SHA256SUMS"
        more = f" and {len(unlisted) - NAMED_FILES} more" if len(unlisted) > NAMED_FILES else ""
        raise OutputError(f"--out {out_dir} holds files that are not a vitcompress bundle's ({why}): "
                          f"{', '.join(unlisted[:NAMED_FILES])}{more}; --force replaces only an empty directory or "
                          "a bundle whose SHA256SUMS lists every file in it: nothing was changed")


def lock_path(out_dir: Path) -> Path:
    """The lock file of ``out_dir``: in this user's lock directory, named by the hash of its absolute path."""
    absolute = Path(os.path.abspath(out_dir))
    key = str(absolute.parent.resolve() / absolute.name)
    return _lock_directory() / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.lock"


def _lock_directory() -> Path:
    """``vitcompress-locks-<uid>`` under the temporary directory, created private; refused when another user
    owns it (they could hold every lock)."""
    directory = Path(tempfile.gettempdir()) / f"vitcompress-locks-{os.getuid()}"
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        owner = directory.lstat().st_uid
    except OSError as exc:
        raise OutputError(f"cannot create the lock directory {directory}: {exc.strerror}") from None
    if owner != os.getuid() or directory.is_symlink():
        raise OutputError(f"the lock directory {directory} belongs to another user: remove it, or set TMPDIR")
    return directory


@contextlib.contextmanager
def output_lock(out_dir: Path) -> Iterator[None]:
    """Hold the exclusive lock of ``out_dir`` while writing it: a second conversion (or re-measurement) of the
    same directory fails at once with an OutputError instead of mixing its files into the bundle."""
    lock = FileLock(lock_path(out_dir))
    try:
        lock.acquire(blocking=False)
    except Timeout:
        raise OutputError(f"another vitcompress convert is writing {out_dir} now: wait for it, or choose "
                          "another --out") from None
    except OSError as exc:
        raise OutputError(f"cannot lock {out_dir} ({lock.lock_file}): {exc.strerror or exc}") from None
    try:
        yield
    finally:
        lock.release()


class OutputTransaction:
    """The output directory of one conversion, written whole or not at all::

        output = OutputTransaction(out_dir, force=force, resume=resume)  # None: a new temporary directory
        output.check()                                                   # before any work: bad --out fails now
        with output.writing(identity, checkpointing=True) as work_dir:
            ...                                                          # every file goes into work_dir
        # out_dir is the finished bundle now

    Only the process that writes (rank 0 of a torchrun job) checks and enters it; every rank reads ``out_dir``
    and ``checkpoint_dir`` (None for a temporary output, which is never resumed).
    """

    def __init__(self, out_dir: str | Path | None, *, force: bool = False, resume: bool = False) -> None:
        if out_dir is None and resume:
            raise OutputError("--resume continues a conversion into its output directory: name it (out_dir)")
        self.temporary = out_dir is None
        self.out_dir = Path(tempfile.mkdtemp(prefix="vitcompress-")) if out_dir is None else Path(out_dir)
        self.force = force
        self.resume = resume
        self.checkpoint_dir = None if self.temporary else checkpoint.directory_for(self.out_dir)

    def check(self) -> None:
        """Raise an OutputError unless ``out_dir`` may be written (a temporary one always may: it is ours)."""
        if not self.temporary:
            check_out_dir(self.out_dir, self.force)

    def discard(self) -> None:
        """After a failed conversion: delete a temporary ``out_dir`` (a named one is never touched here)."""
        if self.temporary:
            shutil.rmtree(self.out_dir, ignore_errors=True)

    @contextlib.contextmanager
    def writing(self, identity: dict[str, Any], checkpointing: bool) -> Iterator[Path]:
        """Create the missing parents of ``out_dir``, take its lock, check it again under the lock, start the
        checkpoint directory's lifetime (:func:`~vitcompress.training.checkpoint.lifetime`: ``identity`` is what a
        ``--resume`` must match; ``checkpointing``: the fine-tune saves checkpoints) and yield a new work directory.
        When the body finishes, the work directory becomes ``out_dir``; when it raises (a SIGTERM included), the
        work directory and the parents created here are removed, and ``out_dir`` is left as it was."""
        created = self._make_parents()
        try:
            with self._lock():
                self.check()  # the check that counts: no other conversion into out_dir runs while we hold the lock
                with checkpoint.lifetime(self.checkpoint_dir, identity, self.resume, checkpointing):
                    work_dir = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.partial-", dir=self.out_dir.parent))
                    try:
                        work_dir.chmod(0o755)
                        yield work_dir
                        self._commit(work_dir)
                    except BaseException:
                        shutil.rmtree(work_dir, ignore_errors=True)
                        raise
        except BaseException:
            for directory in created:  # deepest first, each only if still empty
                with contextlib.suppress(OSError):
                    directory.rmdir()
            raise

    def _lock(self) -> contextlib.AbstractContextManager[None]:
        """The output's lock; none for a temporary directory, whose name no other process knows."""
        return contextlib.nullcontext() if self.temporary else output_lock(self.out_dir)

    def _make_parents(self) -> list[Path]:
        """Create the missing parents of ``out_dir``; returns those created, deepest first."""
        parent = self.out_dir.parent
        missing = [p for p in [parent, *parent.parents] if not p.exists()]
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create {parent}: {exc.strerror}") from None
        return missing

    def _commit(self, work_dir: Path) -> None:
        """Rename the finished ``work_dir`` to ``out_dir``. An existing ``out_dir`` (checked once more: only a
        program other than vitcompress can have changed it under the lock) is moved aside first and deleted once
        the new bundle is in place."""
        if not self.out_dir.exists():
            work_dir.rename(self.out_dir)
            return
        try:
            self.check()
        except OutputError as exc:
            raise OutputError(f"--out {self.out_dir} changed during the conversion and was left as it is "
                              f"(the new bundle is discarded): {exc}") from None
        old = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.old-", dir=self.out_dir.parent))
        self.out_dir.rename(old / "bundle")
        work_dir.rename(self.out_dir)
        shutil.rmtree(old, ignore_errors=True)
