"""What a DALL·E run knows: suggestions from its training captions, and the notice for words it never saw."""

from clipdalle.prompts import TrainingPrompts, words_of, write_training_prompts


def test_training_prompts_suggest_known_captions_and_name_unknown_words(tmp_path):
    captions = ["a red icon of a heart", "a red icon of a heart", "a blue icon of a home", "a red icon of a home"]
    write_training_prompts(tmp_path, captions + ["  ", "A   Red icon of a star"])
    prompts = TrainingPrompts.load(tmp_path)
    assert prompts.captions[0] == "a red icon of a heart"  # most frequent first, whitespace collapsed, case kept
    assert prompts.words["red"] == 4 and prompts.words["heart"] == 2
    assert prompts.suggest("a red icon of a h") == ["a red icon of a heart", "a red icon of a home"]
    assert prompts.suggest("home") == ["a blue icon of a home", "a red icon of a home"]  # by words when no prefix
    assert prompts.suggest("", limit=2) == prompts.captions[:2]
    assert prompts.notice("a red icon of a heart") is None
    assert prompts.notice("A Green icon of a Dog!") == "not in this model's training set: green, dog; expect a guess"
    assert prompts.unknown_words("dog dog cat") == ["dog", "cat"]
    assert TrainingPrompts.load(tmp_path / "elsewhere") is None  # a run trained before prompts.json existed
    assert words_of("Café, naïve-art 3D") == ["café", "naïve", "art", "3d"]
