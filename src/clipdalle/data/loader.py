"""The stream of batches every training run reads: deterministic, split across processes, resumable.

Each consumer (one loader worker of one DDP rank) reads its own share of a source's units (tar shards or
chunks of a file list; when there are fewer units than consumers, every consumer reads all units and keeps
every n-th record), shuffles records through a seeded buffer, and cuts them into batches of `batch_size`
records. Everything random is seeded by (seed, epoch, consumer) or (seed, epoch, key), so the sequence of
batches is a pure function of the configuration. With `torch.utils.data.DataLoader`, worker w delivers batches
w, w + W, w + 2W, ... of a rank's stream; a resumed run therefore starts each worker at its own offset and
skips the batches before it without decoding a single image.

An unreadable sample (its image, or its caption: a Record with `error` set) is dropped from its batch and counted
in the batch's `skipped` field, never fatal.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..transforms import BadImage, resize_crop, to_tensor
from .sources import Record, Source, is_validation

SHUFFLE_BUFFER = 2000  # records held for shuffling per consumer; shards should already be shuffled on write


@dataclass(frozen=True)
class Augment:
    min_scale: float = 0.8  # random resized crop keeps at least this area fraction
    max_shift: float = 0.0  # random translation, as a fraction of the image size


class SampleStream(IterableDataset):
    """Batches of {"keys", "images" (B,3,H,W) in [0,1], "captions", "skipped", "epoch"} from a Source; from a
    token cache (records with `codes`), "codes" (B, h*w) instead of "images".

    `holdout`: None keeps every record; "train" / "val" keeps records by a stable hash of their key, so a
    dataset without a val/ folder splits the same way in every run. `infinite` streams run through epochs
    forever (training); finite ones end after one pass (evaluation, index building). `start_batch` skips the
    first batches of this rank's stream (resume). `keep_all_captions` gives every caption of a sample joined by
    newlines instead of one drawn at random (for caching). `caption_templates` puts each drawn caption into one of
    them at random ("a picture of {}"). A token-cache record with several code views (V, h*w) gives one of them,
    drawn per epoch. With `hard_negative_words`, a share `hard_negative_share` of the batches hold only samples whose
    captions contain the same one of those words (`hard_negative_batches`): in such a batch that word tells no pair
    from another, so a contrastive model must learn everything else the captions say (e.g. the colours of icons: the
    shapes)."""

    def __init__(
        self,
        source: Source,
        *,
        image_size: int,
        batch_size: int,
        seed: int = 0,
        holdout: str | None = None,
        val_fraction: float = 0.02,
        augment: Augment | None = None,
        shuffle: bool = True,
        infinite: bool = True,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        keep_all_captions: bool = False,
        caption_templates: tuple[str, ...] = (),
        hard_negative_words: tuple[str, ...] = (),
        hard_negative_share: float = 0.5,
    ):
        super().__init__()
        if holdout not in (None, "train", "val"):
            raise ValueError(f"holdout must be None, 'train' or 'val', got {holdout!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.source = source
        self.image_size = image_size
        self.batch_size = batch_size
        self.seed = seed
        self.holdout = holdout
        self.val_fraction = val_fraction
        self.augment = augment
        self.shuffle = shuffle
        self.infinite = infinite
        self.start_batch = start_batch
        self.rank = rank
        self.world_size = world_size
        self.keep_all_captions = keep_all_captions
        self.caption_templates = tuple(caption_templates)
        if not 0.0 <= hard_negative_share <= 1.0:
            raise ValueError(f"hard_negative_share must be in [0, 1], got {hard_negative_share}")
        self.hard_negative_words = tuple(word.lower() for word in hard_negative_words)
        self.hard_negative_share = hard_negative_share if hard_negative_words else 0.0

    # ------------------------------------------------------------------------------------------------ records

    def _consumer(self) -> tuple[int, int, int, int]:
        """(consumer index, consumer count, this worker's role, workers per rank).

        The DataLoader asks worker 0 first, then 1, ... in a cycle. Batch i of a rank belongs to role i % workers,
        so a stream resumed at `start_batch` gives worker w the role (w + start_batch) % workers: worker 0 then
        delivers batch start_batch, as the uninterrupted run's loader did at that point."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        role = (worker + self.start_batch) % workers
        return self.rank * workers + role, self.world_size * workers, role, workers

    def _keep(self, record: Record) -> bool:
        if self.holdout is None:
            return True
        return is_validation(record.key, self.val_fraction) == (self.holdout == "val")

    def _epoch_records(self, epoch: int, consumer: int, consumers: int) -> Iterator[tuple[int, Record]]:
        units = list(self.source.units)
        if self.shuffle:
            random.Random(f"units:{self.seed}:{epoch}").shuffle(units)
        if len(units) >= consumers:
            for unit in units[consumer::consumers]:
                for record in self.source.records(unit):
                    if self._keep(record):
                        yield epoch, record
        else:  # fewer units than consumers: everyone reads everything and keeps its own records
            index = 0
            for unit in units:
                for record in self.source.records(unit):
                    if index % consumers == consumer and self._keep(record):
                        yield epoch, record
                    index += 1

    def _records(self, consumer: int, consumers: int) -> Iterator[tuple[int, Record]]:
        epoch = 0
        while True:
            produced = 0
            records = self._epoch_records(epoch, consumer, consumers)
            if self.shuffle:
                records = shuffled(records, random.Random(f"buffer:{self.seed}:{epoch}:{consumer}"), SHUFFLE_BUFFER)
            for item in records:
                produced += 1
                yield item
            if not self.infinite:
                return
            if produced == 0:
                raise ValueError(
                    f"{self.source.path}: no samples for process {self.rank} (of {self.world_size}) / loader worker "
                    f"{consumer % max(1, consumers // self.world_size)}; the dataset is too small for this many "
                    "consumers, or the validation hold-out took everything"
                )
            epoch += 1

    # ------------------------------------------------------------------------------------------------ batches

    def __iter__(self) -> Iterator[dict]:
        consumer, consumers, role, workers = self._consumer()
        # Batch i of this rank comes from role i % workers; skip this role's batches before start_batch.
        skip = max(0, -(-(self.start_batch - role) // workers))
        items = self._records(consumer, consumers)
        for group in hard_negative_batches(items, self.batch_size, self._group_of, self.hard_negative_share):
            if skip > 0:
                skip -= 1
            else:
                yield self._load(group)

    def _group_of(self, item: tuple[int, Record]) -> str | None:
        """The first of `hard_negative_words` that the record's captions contain, as a word; None without one."""
        if not self.hard_negative_words:
            return None
        words = {word for caption in item[1].captions for word in caption.lower().split()}
        return next((word for word in self.hard_negative_words if word in words), None)

    def _load(self, group: list[tuple[int, Record]]) -> dict:
        keys, images, codes, captions, skipped = [], [], [], [], 0
        for epoch, record in group:
            rng = random.Random(f"sample:{self.seed}:{epoch}:{record.key}")
            if record.codes is not None:
                views = record.codes  # (h*w,), or (V, h*w) for a cache of augmented views
                row = views[rng.randrange(len(views))] if views.ndim == 2 else views
                codes.append(torch.as_tensor(row, dtype=torch.long))
            else:
                try:
                    images.append(self._image(record, rng))
                except BadImage:
                    skipped += 1
                    continue
            keys.append(record.key)
            if self.keep_all_captions:
                captions.append("\n".join(record.captions))
            else:
                caption = rng.choice(record.captions) if record.captions else ""
                if self.caption_templates and caption:
                    caption = rng.choice(self.caption_templates).replace("{}", caption)
                captions.append(caption)
        if skipped and self.infinite and keys:
            # Training keeps every batch full: DDP ranks must agree on batch sizes (CLIP gathers features
            # across them), so the samples of this batch stand in for the unreadable ones.
            samples, good = (codes if codes else images), len(keys)
            for index in range(skipped):
                keys.append(keys[index % good])
                captions.append(captions[index % good])
                samples.append(samples[index % good])
        batch = {"keys": keys, "captions": captions, "skipped": skipped, "epoch": group[-1][0]}
        if codes:
            batch["codes"] = torch.stack(codes)  # (B, h*w)
        else:
            empty = torch.zeros(0, 3, self.image_size, self.image_size)
            batch["images"] = torch.stack(images) if images else empty  # (B, 3, H, W)
        return batch

    def _image(self, record: Record, rng: random.Random) -> torch.Tensor:
        image = record.decode()
        if self.augment is not None:
            image = resize_crop(
                image, self.image_size, rng=rng, min_scale=self.augment.min_scale, max_shift=self.augment.max_shift
            )
        else:
            image = resize_crop(image, self.image_size)
        return to_tensor(image)


def hard_negative_batches(
    items: Iterator, batch_size: int, group_of: Callable[[Any], str | None], share: float
) -> Iterator[list]:
    """Cuts `items` into batches of `batch_size`, in arrival order, except that a share `share` of the batches (spread
    evenly: batch b is grouped when floor((b + 1) share) > floor(b share)) take `batch_size` items of one group
    (`group_of(item)`, None = no group) instead; the items a grouped batch passes over wait for the next batches.
    Deterministic in the order of `items`; the last batch may be short."""
    pending: list[tuple[str | None, Any]] = []
    counts: dict[str, int] = {}
    source = iter(items)
    exhausted = False
    number = 0

    def read() -> bool:
        nonlocal exhausted
        try:
            item = next(source)
        except StopIteration:
            exhausted = True
            return False
        group = group_of(item) if share > 0 else None
        pending.append((group, item))
        if group is not None:
            counts[group] = counts.get(group, 0) + 1
        return True

    while True:
        batch: list = []
        if share > 0 and int((number + 1) * share) > int(number * share):
            while not any(count >= batch_size for count in counts.values()) and read():
                pass
            full = sorted(group for group, count in counts.items() if count >= batch_size)
            if full:
                chosen = full[0]
                taken = [position for position, (group, _) in enumerate(pending) if group == chosen][:batch_size]
                batch = [pending[position][1] for position in taken]
                for position in reversed(taken):
                    del pending[position]
                counts[chosen] -= batch_size
        if not batch:  # an ordinary batch, or no group has enough items left
            while len(pending) < batch_size and read():
                pass
            batch = [item for _, item in pending[:batch_size]]
            for group, _ in pending[:batch_size]:
                if group is not None:
                    counts[group] -= 1
            del pending[:batch_size]
        if not batch:
            return
        yield batch
        number += 1


def shuffled(items: Iterator, rng: random.Random, buffer_size: int) -> Iterator:
    """Streaming shuffle: fill a buffer, then emit a random element for each new one."""
    buffer = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        index = rng.randrange(buffer_size)
        buffer[index], item = item, buffer[index]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def make_loader(stream: SampleStream, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over ready-made batches; workers decode in parallel and deliver in a fixed order.

    `pin_memory` (for a CUDA device) delivers batches in page-locked memory, which the training loop copies to the
    GPU asynchronously at full bus speed. It applies with workers only: the loader's own thread then pins a batch
    while the model computes, where without workers the copy into pinned memory would be one more step's work."""
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
        pin_memory=pin_memory and num_workers > 0,
    )


def batches(
    stream_factory: Callable[[int], SampleStream], num_workers: int, pin_memory: bool = False
) -> Callable[[int], Iterator[dict]]:
    """Turns a `start_batch -> SampleStream` factory into the `start_batch -> batches` function `train` takes."""

    def open_batches(start_batch: int) -> Iterator[dict]:
        return iter(make_loader(stream_factory(start_batch), num_workers, pin_memory))

    return open_batches
