"""The training data stream: deterministic, resumable, split across ranks and workers, tolerant of bad images."""

import itertools

import pytest

from clipdalle.data.loader import SampleStream, make_loader
from clipdalle.data.sources import open_source


def keys_of(batches):
    return [batch["keys"] for batch in batches]


def stream(folder, **options):
    values = dict(image_size=16, batch_size=4, seed=0)
    return SampleStream(open_source(folder), **{**values, **options})


def take(iterable, count):
    return list(itertools.islice(iterable, count))


def test_same_seed_same_batches_other_seed_other_order(shapes_folder):
    first = keys_of(take(make_loader(stream(shapes_folder), num_workers=2), 12))
    again = keys_of(take(make_loader(stream(shapes_folder), num_workers=2), 12))
    other = keys_of(take(make_loader(stream(shapes_folder, seed=1), num_workers=2), 12))
    assert first == again
    assert first != other


@pytest.mark.parametrize("workers", [0, 2])
def test_resuming_at_a_batch_continues_the_same_sequence(shapes_folder, workers):
    full = keys_of(take(make_loader(stream(shapes_folder), num_workers=workers), 20))
    resumed = keys_of(take(make_loader(stream(shapes_folder, start_batch=7), num_workers=workers), 13))
    assert resumed == full[7:]


def test_epochs_cover_everything_once_in_a_new_order(shapes_folder):
    batches = keys_of(take(iter(stream(shapes_folder)), 16))  # 32 images, 8 batches an epoch
    first, second = sum(batches[:8], []), sum(batches[8:], [])
    assert sorted(first) == sorted(second) and len(set(first)) == 32
    assert first != second


def test_ranks_read_disjoint_shares(shapes_folder):
    shares = []
    for rank in (0, 1):
        share = stream(shapes_folder, rank=rank, world_size=2, infinite=False, shuffle=False)
        shares.append(sum(keys_of(share), []))
    assert not set(shares[0]) & set(shares[1])
    assert len(shares[0]) + len(shares[1]) == 32


def test_holdout_splits_are_disjoint_and_complete(shapes_folder):
    train = sum(keys_of(stream(shapes_folder, holdout="train", val_fraction=0.3, infinite=False)), [])
    val = sum(keys_of(stream(shapes_folder, holdout="val", val_fraction=0.3, infinite=False)), [])
    assert val and not set(train) & set(val) and len(train) + len(val) == 32


def test_bad_images_are_counted_and_training_batches_stay_full(shapes_folder):
    (shapes_folder / "circle_red_0.png").write_bytes(b"not an image")
    batches = take(iter(stream(shapes_folder, batch_size=8)), 4)  # one epoch
    assert sum(batch["skipped"] for batch in batches) == 1
    assert all(len(batch["keys"]) == 8 and batch["images"].shape[0] == 8 for batch in batches)
    finite = list(stream(shapes_folder, batch_size=8, infinite=False))
    assert sum(len(batch["keys"]) for batch in finite) == 31


def test_images_are_float_in_unit_range(shapes_folder):
    batch = next(iter(stream(shapes_folder)))
    images = batch["images"]
    assert images.shape == (4, 3, 16, 16) and images.dtype.is_floating_point
    assert 0 <= images.min() and images.max() <= 1
    assert len(batch["captions"]) == 4 and all(batch["captions"])


def test_too_small_a_dataset_for_the_consumers_is_a_clear_error(shapes_folder):
    with pytest.raises(ValueError, match="too small"):
        next(iter(stream(shapes_folder, rank=40, world_size=64)))


def test_pinned_memory_only_with_workers(shapes_folder):
    stream = SampleStream(open_source(shapes_folder), image_size=16, batch_size=4)
    assert make_loader(stream, num_workers=2, pin_memory=True).pin_memory
    assert not make_loader(stream, num_workers=0, pin_memory=True).pin_memory  # the copy would cost a step's time
    assert not make_loader(stream, num_workers=2).pin_memory


def test_hard_negative_batches_alternate_one_group_batches_and_lose_nothing():
    from clipdalle.data.loader import hard_negative_batches

    items = [(index, "abc"[index % 3]) for index in range(60)]
    group_of = lambda item: item[1]  # noqa: E731
    batches = list(hard_negative_batches(iter(items), 4, group_of, share=0.5))
    assert sorted(item for batch in batches for item in batch) == items  # every item once
    grouped = [len({item[1] for item in batch}) == 1 for batch in batches]
    assert all(grouped[1:-2:2]) and not all(grouped[0::2])  # every second batch is one group's (before the end,
    # where a finite stream may hold too few items of any group left)
    assert batches == list(hard_negative_batches(iter(items), 4, group_of, share=0.5))  # deterministic
    plain = list(hard_negative_batches(iter(items), 4, group_of, share=0.0))
    assert plain == [items[start : start + 4] for start in range(0, 60, 4)]
    assert all(len({item[1] for item in batch}) == 1 for batch in hard_negative_batches(iter(items), 4, group_of, 1.0))


def test_streams_with_hard_negative_words_share_a_colour_in_every_second_batch(shapes_folder):
    stream = SampleStream(
        open_source(shapes_folder), image_size=16, batch_size=4, infinite=False, shuffle=False,
        hard_negative_words=("red", "green", "blue", "black"), hard_negative_share=0.5,
    )  # fmt: skip
    batches = list(make_loader(stream))
    palette = {"red", "green", "blue", "black"}
    colours = [
        {word for caption in batch["captions"] for word in caption.split() if word in palette} for batch in batches
    ]
    assert all(len(colour) == 1 for colour in colours[1:-2:2]) and len(colours) == 8
    assert sum(len(batch["keys"]) for batch in batches) == 32
