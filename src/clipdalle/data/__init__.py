"""Datasets: where (image, captions) samples come from and how they reach a training process.

- `sources.py`: folder + .txt, WebDataset shards, manifests, labelled sets -> `Record`s
- `loader.py`: the deterministic, resumable stream of batches shared by every training run
- `shards.py`: writing WebDataset shards; `icons.py`: the built-in Material Design Icons set
"""
