"""Where student artifacts live: a local directory, or object storage through fsspec.

``artifacts: ./artifacts`` keeps each version in ``./artifacts/<task>/<version>/``, written
to ``<version>.partial`` and renamed when complete (atomic on one filesystem).

``artifacts: s3://bucket/prefix`` (or ``gs://``, ``az://``, any URL an installed fsspec
backend handles; ``artifacts_options`` are its storage options, e.g. ``endpoint_url``)
keeps them in the bucket, shared by every replica. Trainers still write and load local
directories: a round writes to a staging directory under ``artifacts_cache``, which is
uploaded file by file with a ``_COMPLETE`` marker last (object stores have no rename, so
the marker is what says a version is whole); a replica loading a version downloads it
into ``artifacts_cache`` once, to a temporary name renamed when complete.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

COMPLETE_MARKER = "_COMPLETE"


def is_url(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


class ArtifactStore:
    def __init__(
        self, location: str | Path, cache: str | Path | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.location = str(location).removeprefix("file://")
        self.remote = is_url(self.location)
        self.cache = Path(cache) if cache is not None else Path("./artifacts-cache")
        self._fs: Any = None
        self._root = self.location.rstrip("/")
        if self.remote:
            from fsspec.core import url_to_fs

            try:
                self._fs, self._root = url_to_fs(self.location, **(options or {}))
            except (ImportError, ValueError) as exc:
                raise ValueError(f"artifacts {self.location!r}: {exc}") from exc
            self._root = self._root.rstrip("/")

    def __repr__(self) -> str:
        return f"ArtifactStore({self.location!r})"

    # -- where a version lives -------------------------------------------------------------
    def path_of(self, task: str, version: str) -> str:
        """What the registry records: a local directory, or the version's URL."""
        if self.remote:
            protocol = self.location.split("://", 1)[0]
            return f"{protocol}://{self._root}/{task}/{version}"
        # Absolute: a relative root would tie the record to the directory `train` ran in.
        return str((Path(self.location) / task / version).absolute())

    def _local_dir(self, artifact_path: str) -> Path:
        """A local version's directory: where the registry recorded it, or, when the
        artifacts have moved since (another mount point, a copied store), the same
        task/version under this store's location."""
        recorded = Path(artifact_path)
        if recorded.is_dir():
            return recorded
        moved = Path(self.location) / recorded.parent.name / recorded.name
        return moved if moved.is_dir() else recorded

    def _key(self, artifact_path: str) -> str:
        return artifact_path.split("://", 1)[1] if "://" in artifact_path else artifact_path

    def _cached(self, artifact_path: str) -> Path:
        task, version = artifact_path.rstrip("/").rsplit("/", 2)[-2:]
        return self.cache / task / version

    # -- writing a version -----------------------------------------------------------------
    def staging_path(self, artifact_path: str) -> Path:
        """Where the version is staged: beside it locally, in the cache when remote."""
        return (Path(artifact_path + ".partial") if not self.remote
                else Path(str(self._cached(artifact_path)) + ".partial"))

    def staging(self, artifact_path: str) -> Path:
        """An empty local directory for the trainer to write the version into."""
        path = self.staging_path(artifact_path)
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    def publish(self, artifact_path: str) -> None:
        """The staged version is complete: put it in place (never half visible)."""
        partial = self.staging_path(artifact_path)
        if not self.remote:
            final = Path(artifact_path)
            if final.exists():
                shutil.rmtree(final)
            partial.rename(final)  # atomic on one filesystem
            return
        key = self._key(artifact_path)
        if self._fs.exists(key):
            self._fs.rm(key, recursive=True)
        files = sorted(p for p in partial.rglob("*") if p.is_file())
        for file in files:
            self._fs.put_file(str(file), f"{key}/{file.relative_to(partial).as_posix()}")
        listing = {f.relative_to(partial).as_posix(): f.stat().st_size for f in files}
        self._fs.pipe_file(f"{key}/{COMPLETE_MARKER}", json.dumps(listing).encode())
        # this replica has it already: keep the staged copy as its cache
        cached = self._cached(artifact_path)
        if cached.exists():
            shutil.rmtree(cached)
        partial.rename(cached)

    def discard(self, artifact_path: str) -> None:
        """Drop what a failed round staged."""
        shutil.rmtree(self.staging_path(artifact_path), ignore_errors=True)

    # -- reading and deleting ----------------------------------------------------------------
    def exists(self, artifact_path: str) -> bool:
        if not self.remote:
            return self._local_dir(artifact_path).is_dir()
        return bool(self._fs.exists(f"{self._key(artifact_path)}/{COMPLETE_MARKER}"))

    def local(self, artifact_path: str) -> Path:
        """A local directory holding the version (downloaded once when remote)."""
        if not self.remote:
            return self._local_dir(artifact_path)
        cached = self._cached(artifact_path)
        if cached.is_dir():
            return cached
        key = self._key(artifact_path)
        try:
            listing = json.loads(self._fs.cat_file(f"{key}/{COMPLETE_MARKER}"))
        except FileNotFoundError:
            raise FileNotFoundError(f"artifact {artifact_path} is missing or incomplete") from None
        download = cached.with_name(f"{cached.name}.download-{uuid.uuid4().hex[:8]}")
        try:
            for name, size in listing.items():
                target = download / name
                target.parent.mkdir(parents=True, exist_ok=True)
                self._fs.get_file(f"{key}/{name}", str(target))
                if target.stat().st_size != size:
                    raise OSError(f"{artifact_path}/{name}: {target.stat().st_size} bytes "
                                  f"downloaded, {size} uploaded")
            try:
                download.rename(cached)
            except OSError:
                if not cached.is_dir():  # not another process's download that won the race
                    raise
        finally:
            shutil.rmtree(download, ignore_errors=True)
        self._forget_deleted(cached.parent)
        return cached

    def _forget_deleted(self, task_dir: Path) -> None:
        """Drop cached copies of versions the store no longer has (pruned by the round that
        deleted them, on another machine), so a replica's cache stays as small as the
        registry keeps it."""
        for copy in task_dir.iterdir():
            # "." in a name: a staging or download temporary, not a version
            if (copy.is_dir() and "." not in copy.name
                    and not self.exists(self.path_of(task_dir.name, copy.name))):
                shutil.rmtree(copy, ignore_errors=True)

    def delete(self, artifact_path: str) -> bool:
        """Remove a version (and this replica's copy); True if there was one."""
        if not self.remote:
            local = self._local_dir(artifact_path)
            if local.exists():
                shutil.rmtree(local, ignore_errors=True)
                return True
            return False
        shutil.rmtree(self._cached(artifact_path), ignore_errors=True)
        key = self._key(artifact_path)
        if self._fs.exists(key):
            self._fs.rm(key, recursive=True)
            return True
        return False
