"""Interaction logs and item catalogs: loaders, the leave-one-out split, synthetic streams.

MovieLens files are never committed: they are read from a path (DATA_DIR, default
../shared/data/ml-100k). Everything here is plain Python + numpy.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from streams.errors import InterestStreamError

log = logging.getLogger(__name__)

GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
          "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
          "Romance", "Sci-Fi", "Thriller", "War", "Western")


class DataError(InterestStreamError):
    """An interaction log or catalog cannot be read."""


@dataclass(frozen=True, slots=True)
class Interaction:
    user_id: str
    item_id: str
    ts: int  # epoch seconds
    event_type: str = "rating"


@dataclass
class Dataset:
    name: str
    interactions: list[Interaction]  # ordered by (user, ts) after `sorted_by_time`
    items: dict[str, dict]  # item_id -> {"title", "text"}
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count

    def content_hash(self) -> str:
        digest = hashlib.sha256()
        for it in self.interactions:
            digest.update(f"{it.user_id}\t{it.item_id}\t{it.ts}\n".encode())
        return digest.hexdigest()


def _count(skipped: dict, reason: str) -> None:
    skipped[reason] = skipped.get(reason, 0) + 1


def load_movielens(path: str | Path) -> Dataset:
    """MovieLens-100K: u.data (user, item, rating, ts) and u.item (title, date, genres)."""
    path = Path(path)
    data_file, item_file = path / "u.data", path / "u.item"
    for f in (data_file, item_file):
        if not f.is_file():
            raise DataError(
                f"{f} not found. Put MovieLens-100K (u.data, u.item) in {path} or pass "
                f"--data / DATA_DIR (the files are not redistributable and not in git)."
            )
    items = {}
    with open(item_file, encoding="latin-1") as handle:
        for line in handle:
            parts = line.rstrip("\n").split("|")
            if len(parts) < 24:
                continue
            item_id, title = parts[0], parts[1]
            genres = [g for g, flag in zip(GENRES, parts[5:24]) if flag == "1" and g != "unknown"]
            items[item_id] = {"title": title, "text": f"{title}. {', '.join(genres)}"}
    interactions, skipped = [], {}
    with open(data_file, encoding="latin-1") as handle:
        for line in handle:
            parts = line.split()
            if len(parts) != 4 or not parts[3].isdigit():
                _count(skipped, "malformed_line")
                continue
            if parts[1] not in items:
                _count(skipped, "unknown_item")
                continue
            interactions.append(Interaction(parts[0], parts[1], int(parts[3])))
    return _finish(Dataset("ml-100k", interactions, items, skipped))


def load_catalog(path: str | Path) -> dict[str, dict]:
    """Item catalog, CSV or JSONL with item_id,text[,title]."""
    items = {}
    for row in _rows(Path(path)):
        if "item_id" not in row or "text" not in row:
            raise DataError(f"{path}: every catalog row needs item_id and text, got {sorted(row)}")
        items[str(row["item_id"])] = {"title": str(row.get("title") or row["text"])[:200],
                                      "text": str(row["text"])}
    return items


# a generic log's columns, and the other names they go by (MovieLens' ratings.csv among them)
COLUMNS = {"user_id": ("user_id", "userId", "user"), "item_id": ("item_id", "itemId", "movieId", "item"),
           "timestamp": ("timestamp", "ts", "time")}
JSONL = (".jsonl", ".json", ".ndjson")  # suffixes read as one JSON object per line
LOG_FORMAT = ("CSV with a header, or JSONL: user_id,item_id,timestamp[,event_type] "
              "(timestamp in epoch seconds or ms)")


def _column(row: dict, name: str):
    for alias in COLUMNS[name]:
        if alias in row:
            return row[alias]
    raise KeyError(name)


def load_log(path: str | Path, catalog: str | Path | None = None,
             items: dict[str, dict] | None = None) -> Dataset:
    """Generic interaction log: CSV or JSONL with user_id,item_id,timestamp[,event_type]
    (also read under MovieLens' names userId,movieId,timestamp).

    Timestamps may be epoch seconds or milliseconds (values above 1e11 are read as ms).
    Items absent from the catalog (when one is given) are skipped and counted.
    """
    path = Path(path)
    if items is None and catalog:
        items = load_catalog(catalog)
    interactions, skipped, seen_items, names = [], {}, {}, {}
    first_bad, header = None, None
    for number, row in enumerate(_rows(path), start=2 if path.suffix not in JSONL else 1):
        header = header or sorted(row)
        try:
            user, item = str(_column(row, "user_id")), str(_column(row, "item_id"))
            ts = float(_column(row, "timestamp"))
            if not user or not item or ts != ts or ts < 0:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            _count(skipped, "malformed_line")
            first_bad = first_bad or (number, row)
            continue
        if items is not None and item not in items:
            _count(skipped, "unknown_item")
            continue
        seen_items.setdefault(item, {"title": item, "text": f"item {item}"})
        # one string object per distinct id: a log's ids repeat, and each row's own copy
        # would make the loaded log several times its size on disk
        interactions.append(Interaction(
            names.setdefault(user, user), names.setdefault(item, item),
            int(ts / 1000 if ts > 1e11 else ts),
            names.setdefault(kind := str(row.get("event_type") or "click"), kind)))
    if not interactions and first_bad:
        number, row = first_bad
        raise DataError(f"{path}: no usable interactions; expected {LOG_FORMAT}, found columns "
                        f"{header}; first bad line {number}: {dict(row)} (skipped: {skipped})")
    if items is None:
        log.warning("%s: no --catalog, so every item's text is its id: the text rows (bert, "
                    "bert_text) and the long-term model's text input carry no meaning", path)
    return _finish(Dataset(path.stem, interactions, items or seen_items, skipped))


def load_movielens_csv(path: str | Path) -> Dataset:
    """MovieLens' current layout (ml-latest, ml-25m, ...): ratings.csv and movies.csv."""
    path = Path(path)
    items = {}
    for row in _rows(path / "movies.csv"):
        genres = [g for g in str(row.get("genres", "")).split("|") if g and g != "(no genres listed)"]
        items[str(row["movieId"])] = {"title": str(row["title"])[:200],
                                      "text": f"{row['title']}. {', '.join(genres)}"}
    ds = load_log(path / "ratings.csv", items=items)
    ds.name = path.name
    return ds


def load_any(path: str | Path, catalog: str | Path | None = None) -> Dataset:
    """A MovieLens folder (u.data + u.item, or ratings.csv + movies.csv), or a generic log."""
    path = Path(path)
    if path.is_dir():
        if (path / "u.data").is_file():
            return load_movielens(path)
        if (path / "ratings.csv").is_file() and (path / "movies.csv").is_file():
            return load_movielens_csv(path)
        raise DataError(f"{path} holds neither MovieLens layout (u.data + u.item, or ratings.csv + "
                        f"movies.csv); pass a log file instead: {LOG_FORMAT}, with --catalog "
                        f"for the items' text")
    if not path.is_file():
        raise DataError(f"{path} not found: --data (or DATA_DIR) takes a MovieLens folder or a "
                        f"log file ({LOG_FORMAT}); MovieLens files are never in git")
    if path.name == "ratings.csv" and not catalog and (path.parent / "movies.csv").is_file():
        return load_movielens_csv(path.parent)
    return load_log(path, catalog)


def _rows(path: Path):
    if not path.is_file():
        raise DataError(f"{path} not found")
    with open(path, encoding="utf-8") as handle:
        if path.suffix in JSONL:
            for line in handle:
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = None
                yield obj if isinstance(obj, dict) else {}
        else:
            yield from csv.DictReader(handle)


def _finish(ds: Dataset) -> Dataset:
    """Drop exact duplicates (counted), order by user then time; ties keep the log's order.

    Not by item id: within a second of bulk ratings that makes "the next item has a higher id"
    learnable, a pattern no live stream has, and puts each user's rarest (highest-id) items
    last, i.e. in the test split."""
    unique = list(dict.fromkeys(ds.interactions))
    if len(unique) != len(ds.interactions):
        ds.skipped["duplicate"] = ds.skipped.get("duplicate", 0) + len(ds.interactions) - len(unique)
    ds.interactions = sorted(unique, key=lambda it: (it.user_id, it.ts))  # stable
    if not ds.interactions:
        raise DataError(f"{ds.name}: no usable interactions (skipped: {ds.skipped})")
    if ds.skipped:
        log.warning("%s: skipped %s", ds.name, ds.skipped)
    return ds


def _natural(item_id: str):
    return (0, int(item_id), "") if item_id.isdigit() else (1, 0, item_id)


def k_core(ds: Dataset, min_user: int = 0, min_item: int = 0) -> Dataset:
    """Iteratively drop users with fewer than `min_user` and items with fewer than `min_item`
    interactions until both hold (the filtering published sequential tables use); the removed
    interactions are counted in `skipped`."""
    interactions = ds.interactions
    while min_user > 1 or min_item > 1:
        users = defaultdict(int)
        items = defaultdict(int)
        for it in interactions:
            users[it.user_id] += 1
            items[it.item_id] += 1
        kept = [it for it in interactions
                if users[it.user_id] >= min_user and items[it.item_id] >= min_item]
        if len(kept) == len(interactions):
            break
        interactions = kept
    removed = len(ds.interactions) - len(interactions)
    if not interactions:
        raise DataError(f"{ds.name}: no interactions left after the {min_user}-user/"
                        f"{min_item}-item core filter")
    skipped = dict(ds.skipped)
    if removed:
        skipped["k_core"] = removed
    return Dataset(ds.name, interactions, ds.items, skipped)


def items_in_log(ds: Dataset) -> Dataset:
    """The same log with its catalog cut to the items that occur in it: the ranking's
    universe is the catalog, and items nobody ever chose only dilute it."""
    occurring = {it.item_id for it in ds.interactions}
    return Dataset(ds.name, ds.interactions, {i: v for i, v in ds.items.items() if i in occurring},
                   dict(ds.skipped))


def never_chosen(ds: Dataset) -> int:
    """How many catalog items never occur in the log (candidates all the same)."""
    occurring = {it.item_id for it in ds.interactions}
    return sum(1 for i in ds.items if i not in occurring)


def user_sequences(ds: Dataset) -> dict[str, list[Interaction]]:
    seqs: dict[str, list[Interaction]] = defaultdict(list)
    for it in ds.interactions:
        seqs[it.user_id].append(it)
    return dict(seqs)


@dataclass
class Split:
    train: dict[str, list[Interaction]]  # all but the last two (or everything for short users)
    valid: dict[str, Interaction]  # second-to-last
    test: dict[str, Interaction]  # last


def leave_one_out(ds: Dataset, min_len: int = 3) -> Split:
    """Per user in time order: last = test, second-to-last = validation, the rest = train.

    Users with fewer than `min_len` interactions only train.
    """
    train, valid, test = {}, {}, {}
    for user, seq in user_sequences(ds).items():
        if len(seq) >= min_len:
            train[user], valid[user], test[user] = seq[:-2], seq[-2], seq[-1]
        else:
            train[user] = seq
    return Split(train, valid, test)


def synthetic(n_users: int = 300, n_items: int = 400, n_topics: int = 8, events_per_user: int = 40,
              session_len: int = 6, seed: int = 0, walk: bool = True, taste: int = 2,
              in_taste: float = 0.8) -> Dataset:
    """A stream with planted structure.

    Items belong to topics and their text names the topic. Each user has a stable long-term
    taste (`taste` favourite topics) and short sessions that drift: each session picks a
    topic, from the taste with probability `in_taste`, and walks through that topic's items
    in catalog order (`walk`) or picks them at random, so the next item is predictable from
    the recent ones (short-term) and from the taste (long-term).
    """
    rng = random.Random(seed)
    words = ["space", "cooking", "jazz", "football", "history", "garden", "finance", "horror",
             "poetry", "chess", "travel", "robots"]
    topic_items = defaultdict(list)
    items = {}
    for i in range(1, n_items + 1):
        topic = (i - 1) % n_topics
        topic_items[topic].append(str(i))
        name = words[topic % len(words)]
        items[str(i)] = {"title": f"{name.title()} story #{i}", "text": f"A {name} story, {name} number {i}"}
    interactions = []
    t0 = 1_700_000_000
    for u in range(1, n_users + 1):
        favourites = rng.sample(range(n_topics), taste)
        ts = t0 + rng.randrange(86_400)
        count = 0
        while count < events_per_user:
            topic = (rng.choice(favourites) if rng.random() < in_taste
                     else rng.randrange(n_topics))
            pool = topic_items[topic]
            start = rng.randrange(len(pool))
            # picked at random, sessions also vary in length (1 .. 2 * session_len - 1), so
            # that the validation and test events are not always at the same place in one
            length = session_len if walk else rng.randrange(1, 2 * session_len)
            for step in range(length):
                if count >= events_per_user:
                    break
                item = pool[(start + step) % len(pool)] if walk else rng.choice(pool)
                interactions.append(Interaction(str(u), item, ts, "click"))
                ts += rng.randrange(20, 120)
                count += 1
            ts += rng.randrange(3_600, 86_400)
    return _finish(Dataset("synthetic", interactions, items, {}))
