"""What the catalogue says of one model (`ModelEntry`) and of a file on the Hugging Face hub (`HubFile`): the records
models/catalogue.py lists and models/cache.py fetches."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HubFile:
    """A file in a Hugging Face hub repo, pinned to a commit."""

    repo_id: str
    filename: str
    revision: str  # a 40-hex commit hash, never a branch

    def __str__(self) -> str:
        return f"hf://{self.repo_id}/{self.filename}@{self.revision}"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: str  # "backbone" | "guidance"
    resolution: int  # image side in pixels
    license: str
    description: str
    file: str  # the published file name; every source serves it
    urls: tuple[str, ...] = ()
    hub: tuple[HubFile, ...] = ()
    sha256: str | None = None  # published; None: recorded on the first download
    size: int | None = None  # bytes, likewise
    aliases: tuple[str, ...] = ()
    embedded: bool = False  # ships in weights/ (file is its name there)
    backbone: str | None = None  # guidance: the backbone it was trained on
    note: str = ""  # why there is no source, for entries without one
    knows: str = ""  # backbones: what its training images show, in a few words (`aid inpaint` says it)

    @property
    def converts(self) -> bool:
        """An official pickle: converted once to `<name>.safetensors`."""
        return self.file.endswith(".pkl")

    @property
    def sources(self) -> list[str]:
        return [str(h) for h in self.hub] + list(self.urls)
