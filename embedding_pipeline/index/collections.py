"""One Milvus collection per model, behind one alias that search uses.

The configured ``milvus.collection`` (say ``image_embeddings``) is a Milvus *alias*. Vectors live in per-model
collections named ``<milvus.collection>__<model slug>`` (``image_embeddings__image_embedder_1_3f2a9c1b7d20``), each
created with the model's label recorded as a collection property, so a collection never holds two dimensions or
two models. The index stage writes a drop into its model's collection; search follows the alias. Changing the
model therefore fills a new collection while search keeps answering from the old one, until :meth:`switch` moves
the alias — one ``alter_alias`` call, atomic in Milvus — after checking that the new collection holds every drop.

A real collection already named ``milvus.collection`` (made before per-model collections existed, or by a caller
that uses :class:`ImageIndex` directly) is *legacy*: ingest keeps writing into it while every row in it comes
from the same model, and refuses a drop from another model (it cannot become an alias while it exists).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

from embedding_pipeline.index import expressions
from embedding_pipeline.index.client import CollectionError, ImageIndex
from embedding_pipeline.runtime.objects import ObjectPath
from embedding_pipeline.settings import MilvusSettings, Settings

SEPARATOR = "__"
# Milvus collection names: at most 255 characters, letters, digits and underscores, not starting with a digit.
NAME_MAX = 255
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class SwitchRefused(CollectionError):
    """The target collection does not hold every drop (and the switch was not forced)."""


def model_slug(label: str) -> str:
    """``label`` (``"image_embedder:1@3f2a9c1b7d20"``) as a name part: ``"image_embedder_1_3f2a9c1b7d20"``."""
    slug = re.sub(r"[^A-Za-z0-9_]+", "_", label).strip("_")
    if not slug:
        raise ValueError(f"model label {label!r} has no letters or digits to name a collection after")
    return slug


def model_collection_name(base: str, label: str) -> str:
    """The collection of model ``label`` behind alias ``base``. Too long a name keeps its start and gets a hash of
    the label (two labels never share a name by truncation)."""
    if not _NAME.fullmatch(base):
        raise ValueError(
            f"milvus.collection {base!r} is not a valid Milvus name (letters, digits and '_', not starting with a "
            "digit)"
        )
    name = f"{base}{SEPARATOR}{model_slug(label)}"
    if len(name) <= NAME_MAX:
        return name
    digest = hashlib.sha256(label.encode()).hexdigest()[:12]
    return f"{name[: NAME_MAX - len(digest) - 1]}_{digest}"


def embedded_counts(data_dir: Path | ObjectPath, drops: Iterable[str], label: str) -> dict[str, int | None]:
    """Per drop, how many embeddings of model ``label`` its current embeddings hold: None when the drop has no
    embeddings yet, or holds another model's (it has not been embedded with ``label``)."""
    from embedding_pipeline.storage import arrow

    counts: dict[str, int | None] = {}
    for drop in drops:
        folder = data_dir / "embeddings" / drop
        if not arrow.folder_exists(folder):
            counts[drop] = None
            continue
        total = ours = 0
        for table in arrow.read_batches(folder, columns=["model"]):
            models = table.column("model").to_pylist()
            total += len(models)
            ours += sum(1 for m in models if m == label)
        counts[drop] = ours if ours == total else None
    return counts


def drop_model(data_dir: Path | ObjectPath, drop: str) -> str | None:
    """The model label of the drop's current embeddings (None when it has none: no good image, or not embedded)."""
    from embedding_pipeline.storage import arrow

    for table in arrow.read_batches(data_dir / "embeddings" / drop, columns=["model"]):
        if table.num_rows:
            return str(table.column("model")[0].as_py())
    return None


@dataclass(frozen=True)
class DropCoverage:
    drop: str
    expected: int | None  # embeddings of the model; None: the drop is not embedded with it
    stored: int

    @property
    def complete(self) -> bool:
        return self.expected is not None and self.expected == self.stored

    def describe(self) -> str:
        if self.expected is None:
            return f"{self.drop} (not embedded with this model; {self.stored} rows stored)"
        return f"{self.drop} ({self.stored} of {self.expected} rows)"


def missing_drops(coverage: Iterable[DropCoverage]) -> list[DropCoverage]:
    return [c for c in coverage if not c.complete]


@dataclass(frozen=True)
class Placement:
    """Where the index stage writes a drop, and where search looks meanwhile."""

    collection: str
    search_collection: str | None
    legacy: bool = False

    @property
    def switch_pending(self) -> bool:
        return self.search_collection != self.collection


@dataclass
class CollectionInfo:
    name: str
    model: str
    dimension: int | None
    rows: int
    drops: dict[str, int] = field(default_factory=dict)
    search: bool = False

    def as_dict(self) -> dict:
        return {
            "collection": self.name,
            "model": self.model,
            "dimension": self.dimension,
            "rows": self.rows,
            "drops": self.drops,
            "search": self.search,
        }


def matching_collections(names: Iterable[str], base: str) -> list[str]:
    """The collections that can hold the pipeline's rows under ``base``: ``base`` itself and every
    ``base__<model>``, sorted (``base`` first)."""
    prefix = base + SEPARATOR
    return sorted(n for n in names if n == base or n.startswith(prefix))


class ModelCollections:
    """The per-model collections of ``settings.collection`` and the alias over them. Close it when done."""

    def __init__(self, settings: MilvusSettings, connect_timeout: float = 30.0):
        self.settings = settings
        self.alias = settings.collection
        self.connect_timeout = connect_timeout
        # A client on the alias name: its connection serves every call here.
        self._alias_index = ImageIndex(settings, connect_timeout=connect_timeout)

    @property
    def client(self):  # noqa: ANN201 - a MilvusClient
        return self._alias_index.client

    def close(self) -> None:
        self._alias_index.close()

    def __enter__(self) -> "ModelCollections":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def index(self, collection: str, model_label: str = "") -> ImageIndex:
        """A client for one collection of this alias; the caller closes it."""
        return ImageIndex(
            self.settings.model_copy(update={"collection": collection}), self.connect_timeout, model_label=model_label
        )

    # -- resolution -----------------------------------------------------------------------------------------

    def search_collection(self) -> str | None:
        """The collection search uses: the alias's target, the legacy collection itself, or None (nothing yet)."""
        with self._alias_index.guard("resolving the alias"):
            # Listed first: describing a missing alias is an error that pymilvus logs with a traceback.
            if self.alias in (self.client.list_aliases().get("aliases") or []):
                return str(self.client.describe_alias(self.alias)["collection_name"])
            return self.alias if self.client.has_collection(self.alias) else None

    def is_legacy(self) -> bool:
        """True if ``milvus.collection`` is a real collection rather than an alias."""
        return self.search_collection() == self.alias

    def names(self) -> list[str]:
        """Every collection of this alias: the per-model ones, and the legacy one if it exists."""
        with self._alias_index.guard("listing collections"):
            found = matching_collections(self.client.list_collections(), self.alias)
        # The alias name itself counts only as a real (legacy) collection, never as a second name for another one.
        return [n for n in found if n != self.alias or self.is_legacy()]

    def model_of(self, collection: str) -> str:
        """The model label of a collection: its recorded property, else (legacy) the model of one of its rows."""
        with self.index(collection) as index, index.guard("reading the model"):
            recorded = index.recorded_model()
            if recorded:
                return recorded
            rows = index.client.query(collection, filter='id != ""', output_fields=["model"], limit=1)
            return str(rows[0]["model"]) if rows else ""

    def labels(self) -> set[str]:
        """The model labels of every collection of this alias."""
        return {label for label in (self.model_of(name) for name in self.names()) if label}

    def resolve_target(self, target: str) -> str:
        """A collection of this alias named by ``target``: its name, or the label of its model."""
        names = self.names()
        if target in names:
            return target
        by_label = model_collection_name(self.alias, target) if target else ""
        if by_label in names:
            return by_label
        raise CollectionError(
            f"no collection of {self.alias!r} for {target!r}: it has {', '.join(names) or 'none'} "
            "(name a collection, or the model label it was built with)"
        )

    # -- writing ------------------------------------------------------------------------------------------------

    def index_for_model(self, label: str, dim: int) -> tuple[ImageIndex, Placement]:
        """The collection model ``label``'s vectors go to, created (and the alias with it, if there is none yet)
        when missing; the caller closes the index. Refuses a legacy collection of another model."""
        search = self.search_collection()
        if search == self.alias:
            return self._legacy(label, dim), Placement(self.alias, self.alias, legacy=True)
        name = model_collection_name(self.alias, label)
        index = self.index(name, model_label=label)
        try:
            index.ensure_collection(dim)
            with index.guard("reading the model"):
                recorded = index.recorded_model()
            if recorded != label:
                raise CollectionError(
                    f"collection {name!r} was made for model {recorded or '(none recorded)'}, not {label}; it is not "
                    "used for this model's vectors (drop or rename it)"
                )
            if search is None:
                search = self._create_alias(name)
        except Exception:
            index.close()
            raise
        return index, Placement(name, search)

    def _create_alias(self, collection: str) -> str:
        with self._alias_index.guard("creating the alias"):
            try:
                self.client.create_alias(collection, self.alias)
            except Exception:  # noqa: BLE001 - another process created it first: use whatever it points at
                found = self.search_collection()
                if found is None:
                    raise
                return found
        return collection

    def _legacy(self, label: str, dim: int) -> ImageIndex:
        index = self.index(self.alias)
        try:
            # Models first: another model's vectors are the real reason, whatever the dimensions.
            with index.guard("reading models"):
                others = index.client.query(
                    self.alias, filter=expressions.not_equals("model", label), output_fields=["model"], limit=1
                )
            if not others:
                index.ensure_collection(dim)
        except Exception:
            index.close()
            raise
        if others:
            index.close()
            raise CollectionError(
                f"milvus.collection {self.alias!r} is a plain collection (made before one collection per model) "
                f"holding vectors of model {others[0]['model']}, and this drop was embedded by {label}; models are "
                f"never mixed in one collection. Keep the old model, or set milvus.collection to a new name: it "
                f"becomes an alias over one collection per model, and {self.alias!r} stays as it is"
            )
        return index

    def remove_drop(self, drop: str, keep: Callable[[dict], set] = lambda rows: set()) -> int:
        """Take the drop out of its rows in every collection of this alias (a drop left without a good image),
        except the ids ``keep(rows)`` returns for the drop's rows there (id -> row); returns how many rows it left.
        Collections made before drop membership are never written to here."""
        removed = 0
        for name in self.names():
            with self.index(name) as index:
                if not index.has_membership():
                    continue
                rows = index.drop_rows(drop)
                kept = keep(rows)
                leaving = [row_id for row_id in rows if row_id not in kept]
                if leaving:
                    index.release(drop, leaving)
                    removed += len(leaving)
        return removed

    def drop_all(self) -> list[str]:
        """Remove the alias and every collection behind it (benchmarks and tests cleaning up); returns the
        collections dropped. The alias goes first: dropping a collection by an alias name is refused by Milvus 2.3
        and drops the target on milvus-lite."""
        names = self.names()
        with self._alias_index.guard("dropping the collections"):
            if self.alias in (self.client.list_aliases().get("aliases") or []):
                self.client.drop_alias(self.alias)
            for name in names:
                self.client.drop_collection(name)
        return names

    # -- switching ------------------------------------------------------------------------------------------

    def coverage(self, collection: str, expected: Mapping[str, int | None]) -> list[DropCoverage]:
        """Per drop, the rows ``collection`` holds against the embeddings the drop has for its model."""
        with self.index(collection) as index:
            return [
                DropCoverage(drop, count, index.count_drop(drop, consistency_level="Strong"))
                for drop, count in expected.items()
            ]

    def switch(self, collection: str, expected: Mapping[str, int | None], force: bool = False) -> dict:
        """Point the alias at ``collection`` (one ``alter_alias``: searches see the old or the new collection,
        never a mix) once it holds every drop of ``expected`` (drop -> embeddings count for its model); raises
        :class:`SwitchRefused` listing the drops it lacks unless ``force``."""
        if self.is_legacy():
            raise CollectionError(
                f"milvus.collection {self.alias!r} is a plain collection, not an alias: there is nothing to switch "
                "(set milvus.collection to a new name to use one collection per model)"
            )
        previous = self.search_collection()
        if collection not in self.names():
            drops = ", ".join(expected) or "none"
            raise SwitchRefused(
                f"collection {collection!r} does not exist yet: it lacks all {len(expected)} drop(s) ({drops}); "
                "re-embed them first (embedding-pipeline reembed)"
            )
        missing = missing_drops(self.coverage(collection, expected))
        if missing and not force:
            raise SwitchRefused(
                f"collection {collection!r} lacks {len(missing)} of {len(expected)} drop(s): "
                + ", ".join(m.describe() for m in missing)
                + "; re-embed them first (embedding-pipeline reembed), or force the switch"
            )
        if previous != collection:
            with self._alias_index.guard("moving the alias"):
                if previous is None:
                    self.client.create_alias(collection, self.alias)
                else:
                    self.client.alter_alias(collection, self.alias)
        return {
            "alias": self.alias,
            "from": previous,
            "to": collection,
            "model": self.model_of(collection),
            "drops": len(expected),
            "missing": [m.describe() for m in missing],
            "forced": bool(missing and force),
        }

    # -- listing --------------------------------------------------------------------------------------------

    def describe(self) -> list[CollectionInfo]:
        """Every collection of this alias: model, dimension, rows, rows per drop, and which one search uses."""
        search = self.search_collection()
        out = []
        for name in self.names():
            with self.index(name) as index:
                drops: dict[str, int] = {}
                rows = 0
                fields = ["drop", "drops"] if index.has_membership() else ["drop"]
                for row in index._iterate('id != ""', fields):
                    rows += 1
                    for member in row.get("drops") or [row["drop"]]:
                        drops[member] = drops.get(member, 0) + 1
                out.append(
                    CollectionInfo(
                        name, self.model_of(name), index.dimension(), rows, dict(sorted(drops.items())), name == search
                    )
                )
        return out


def index_for_drop(settings: Settings, milvus: MilvusSettings, drop: str) -> ImageIndex:
    """A client for the collection that holds ``drop``'s rows: its model's collection (from the model of the
    drop's embeddings), or the legacy collection. For a drop without embeddings it is the search collection's
    (the alias), which holds none of its rows. The caller closes it."""
    label = drop_model(settings.outputs, drop)
    with ModelCollections(milvus) as collections:
        if label is None or collections.is_legacy():
            return ImageIndex(milvus)
        return collections.index(model_collection_name(milvus.collection, label), model_label=label)
