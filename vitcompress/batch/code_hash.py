"""The code a batch job runs, as a content hash: the package's files as imported, and its plugins' files.

The package version (``0.1.0`` in every development checkout) says nothing about the code, and an editable
install's ``RECORD`` lists none of its source files: the fingerprint hashes the files themselves, every file
under the imported package's folder (sources, shipped recipes and weights; no ``__pycache__``) by its path
relative to that folder and its bytes. A checkout moved or cloned again (other paths, other modification times)
therefore keeps its fingerprint; an edit to any file changes it. A job's third-party transforms (a recipe's
``plugins:``, entry points) add their modules' files. Reading ~100 files costs little, but the 21 MB of
embedded weights would be read on every batch: each file's sha256 is cached by (path, size, modification time)
in the user's cache folder (``platformdirs``), so an unchanged file is not read again.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import platformdirs

import vitcompress
from vitcompress.files import replace_text

PACKAGE_DIR = Path(vitcompress.__file__).resolve().parent
CACHE_FILE = Path(platformdirs.user_cache_dir("vitcompress")) / "file-sha256.json"
_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks (uncached: the caller decides what may be remembered)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class FileHashes:
    """sha256 of files, remembered by (resolved path, size, mtime in ns) in a JSON file shared by runs."""

    def __init__(self, store: Path) -> None:
        self.store = store
        try:
            loaded = json.loads(store.read_text())
        except (OSError, ValueError):
            loaded = {}
        self.known: dict[str, list] = loaded if isinstance(loaded, dict) else {}
        self.changed = False

    def of(self, path: Path) -> str:
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
        entry = self.known.get(str(path))
        if isinstance(entry, list) and len(entry) == 3 and entry[:2] == stamp:
            return entry[2]
        digest = file_sha256(path)
        self.known[str(path)] = [*stamp, digest]
        self.changed = True
        return digest

    def save(self) -> None:
        """Keep the cache for the next run; a cache folder that cannot be written only costs the next run time."""
        if not self.changed:
            return
        try:
            self.store.parent.mkdir(parents=True, exist_ok=True)
            replace_text(self.store, json.dumps(self.known))
        except OSError:
            pass


def tree_files(root: Path) -> list[Path]:
    """Every file under ``root`` a job's code consists of (compiled caches left out), sorted."""
    return sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                  and p.suffix not in (".pyc", ".pyo"))


def fingerprint(root: Path, extra: Iterable[Path] = (), hashes: FileHashes | None = None) -> str:
    """sha256 over (relative path, sha256) of :func:`tree_files` of ``root``, then (file name, sha256) of each
    ``extra`` file (a plugin module outside the package)."""
    hashes = hashes or FileHashes(CACHE_FILE)
    entries = [(str(p.relative_to(root)), hashes.of(p)) for p in tree_files(root)]
    entries += [(p.name, hashes.of(p)) for p in sorted(set(extra))]
    hashes.save()
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


@cache
def package_fingerprint() -> str:
    """The fingerprint of the vitcompress package this process imported (computed once per process)."""
    return fingerprint(PACKAGE_DIR)


def plugin_files(transform_configs: Iterable[type]) -> list[Path]:
    """The source files of the modules that define the given transforms' functions and configs, where they lie
    outside the package (a recipe's plugins, entry-point transforms)."""
    from vitcompress.transforms import registry

    found = set()
    for config in transform_configs:
        transform = registry.for_config(config)
        modules = {config.__module__} | ({transform.apply.__module__} if transform is not None else set())
        for name in modules:
            file = getattr(sys.modules.get(name), "__file__", None)
            if file and not Path(file).resolve().is_relative_to(PACKAGE_DIR):
                found.add(Path(file).resolve())
    return sorted(found)
