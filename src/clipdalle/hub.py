"""Models by name: where their files live, fetching them once, the caches, the checksums and offline use.

    files = resolve("ViT-B/32")           # OpenAI's nine: RN50 ... ViT-L/14@336px
    files = resolve("ViT-B-32/laion2b_s34b_b79k")   # open_clip ARCH/PRETRAINED tags whose weights are on the Hub
    files = resolve("hf-hub:timm/ViT-B-16-SigLIP")  # an open_clip repo: open_clip_config.json + weights
    files = resolve("google/siglip-base-patch16-224")  # a transformers CLIPModel or SiglipModel repo
    files.path, files.tokenizer           # what clipdalle.pretrained.load reads

OpenAI's files come from the URLs of openai/CLIP's clip.py, whose path carries the file's SHA-256: a download is
written to NAME.part (resumed with an HTTP Range request after an interruption), checked against that SHA-256
(a mismatch is refused and the file removed) and only then renamed into `CLIPDALLE_CACHE/openai/` (default
~/.cache/clipdalle), so a file there has been verified. `CLIPDALLE_OPENAI_URL` replaces OpenAI's base URL.
Hub files go through huggingface_hub, its cache and its variables (HF_ENDPOINT, HF_HUB_CACHE, HF_TOKEN).

A model whose files are all cached loads without any network call (the Hub is not asked for a newer
revision; `clipdalle models download NAME` refreshes it). With HF_HUB_OFFLINE=1 or CLIPDALLE_OFFLINE=1 nothing
is fetched, and a model that is not cached is a one-line error naming the command that fetches it.
This is the only module of the package that opens URLs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .io import file_sha256, fsync

OPENAI_URL = "https://openaipublic.azureedge.net/clip/models"
# openai/CLIP clip.py: name -> "SHA-256 of the file/file name" under OPENAI_URL.
OPENAI_MODELS = {
    "RN50": "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "RN101": "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
    "RN50x4": "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
    "RN50x16": "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
    "RN50x64": "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
    "ViT-B/32": "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}
# OpenAI's BPE (vocab.json + merges.txt) for every model trained with it; OpenAI's files do not include it.
CLIP_BPE_REPO = "openai/clip-vit-base-patch32"
CLIP_BPE_FILES = ("vocab.json", "merges.txt")
# transformers repos `models list` names (any other ORG/NAME holding a CLIPModel or SiglipModel loads too).
TRANSFORMERS_MODELS = (
    "openai/clip-vit-base-patch32",
    "openai/clip-vit-base-patch16",
    "openai/clip-vit-large-patch14",
    "openai/clip-vit-large-patch14-336",
    "google/siglip-base-patch16-224",
    "google/siglip-so400m-patch14-384",
    "google/siglip2-base-patch16-224",
    "google/siglip2-so400m-patch14-384",
)
OPEN_CLIP_TABLE = "open_clip_pretrained.json"  # open_clip's tags with Hub weights, and their architectures
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "spiece.model", "tokenizer.json",
)  # fmt: skip
HUB_PREFIX = "hf-hub:"
CHUNK_BYTES = 1 << 20  # download read size
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")


@dataclass
class ModelFiles:
    name: str  # the name it was resolved from
    path: Path  # a weights file or a model directory, as clipdalle.convert.read_checkpoint reads
    tokenizer: Path | None = None  # tokenizer file or directory when not beside the weights
    open_clip_config: dict[str, Any] | None = None  # a bare open_clip weights file's model config
    quick_gelu: bool | None = None  # the activation an open_clip tag was trained with, when its config cannot say
    sha256: str = ""  # of the weights: names the model in an index
    files: list[Path] = field(default_factory=list)  # every file it consists of (for sizes)


# ------------------------------------------------------------------------------------------ names


def offline() -> bool:
    """True when HF_HUB_OFFLINE or CLIPDALLE_OFFLINE is set to 1/true/yes/on: nothing is fetched."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in (
        "HF_HUB_OFFLINE", "CLIPDALLE_OFFLINE"
    ))  # fmt: skip


def cache_dir() -> Path:
    """Where OpenAI's files go: CLIPDALLE_CACHE, default ~/.cache/clipdalle."""
    return Path(os.environ.get("CLIPDALLE_CACHE") or Path.home() / ".cache" / "clipdalle").expanduser()


@functools.lru_cache(maxsize=1)
def open_clip_table() -> dict[str, Any]:
    """{"archs": {ARCH: open_clip model config}, "tags": {ARCH/TAG: {"repo", and "quick_gelu", "mean", "std" where
    the tag differs from its architecture}}}, read once."""
    return json.loads(resources.files(__package__).joinpath(OPEN_CLIP_TABLE).read_text(encoding="utf-8"))


def kind_of(name: str) -> str | None:
    """openai | open_clip | hf-hub | transformers for a model name, None for anything else (a path)."""
    if name in OPENAI_MODELS:
        return "openai"
    if name.startswith(HUB_PREFIX):
        return "hf-hub" if _is_repo_id(name[len(HUB_PREFIX) :]) else None
    if name.count("/") == 1:
        arch, _ = name.split("/")
        if arch in open_clip_table()["archs"]:
            return "open_clip"
        return "transformers" if _is_repo_id(name) else None
    return None


def _is_repo_id(text: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) is not None and ".." not in text


def download_hint(name: str) -> str:
    return f"run `clipdalle models download {name}` on a machine with network access"


FETCH = ("missing", "refresh", "never")  # what resolve fetches: what is not cached | check the Hub again | nothing


def resolve(name: str, *, fetch: str = "missing") -> ModelFiles:
    """The local files of a named model: fetched when missing, checked against the Hub again with
    fetch="refresh", never fetched with fetch="never" (nor in offline mode: a missing file is a ValueError)."""
    if fetch not in FETCH:
        raise ValueError(f"resolve: fetch={fetch!r}; expected one of {', '.join(FETCH)}")
    kind = kind_of(name)
    if kind is None:
        raise ValueError(f"{name!r}: not a model name clipdalle knows; see `clipdalle models list`")
    if kind == "openai":
        return _resolve_openai(name, fetch)
    if kind == "open_clip":
        arch, tag = name.split("/")
        table = open_clip_table()
        entry = table["tags"].get(name)
        if entry is None:
            tags = sorted(key.split("/")[1] for key in table["tags"] if key.startswith(arch + "/"))
            raise ValueError(
                f"{name!r}: open_clip has no {arch} weights tagged {tag!r} on the Hub; tags: {', '.join(tags)}"
            )
        model_cfg = table["archs"][arch]
        preprocess = {"mean": entry["mean"], "std": entry["std"]} if "mean" in entry else {}
        files = _resolve_open_clip_repo(name, entry["repo"], model_cfg.get("text_cfg", {}), fetch, config_file=False)
        files.open_clip_config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess}
        files.quick_gelu = True if entry.get("quick_gelu") else None
        return files
    if kind == "hf-hub":
        return _resolve_open_clip_repo(name, name[len(HUB_PREFIX) :], None, fetch, config_file=True)
    return _resolve_transformers_repo(name, fetch)


# ------------------------------------------------------------------------------------------ OpenAI's files


def openai_url(name: str) -> str:
    base = (os.environ.get("CLIPDALLE_OPENAI_URL") or OPENAI_URL).rstrip("/")
    return f"{base}/{OPENAI_MODELS[name]}"


def openai_path(name: str) -> Path:
    return cache_dir() / "openai" / OPENAI_MODELS[name].split("/")[1]


def _resolve_openai(name: str, fetch: str) -> ModelFiles:
    sha256 = OPENAI_MODELS[name].split("/")[0]
    target = openai_path(name)
    if not target.is_file():
        if fetch == "never" or offline():
            raise ValueError(f"{name}: not in the cache ({target}) and offline mode is on; {download_hint(name)}")
        download_url(openai_url(name), target, sha256=sha256, label=name)
    tokenizer = _hub_files(
        CLIP_BPE_REPO, CLIP_BPE_FILES, (), name=name, fetch="never" if fetch == "never" else "missing"
    )
    tokenizer_files = [tokenizer.parent / file for file in CLIP_BPE_FILES]
    return ModelFiles(name, target, tokenizer=tokenizer.parent, sha256=sha256, files=[target, *tokenizer_files])


def download_url(url: str, target: Path, *, sha256: str | None = None, label: str = "") -> Path:
    """Fetches `url` into `target` atomically: bytes go to TARGET.part (resumed with a Range request when a part is
    there), are checked against `sha256`, and the part is renamed to `target` only then. A mismatch removes the
    part; when it was a resumed part, the whole file is fetched once more before giving up."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    with _exclusive(target.with_name(target.name + ".lock")):  # two processes never write one part
        if target.is_file():  # the other process finished it
            return target
        for _ in range(2):
            resumed = _fetch(url, part, label or target.name)
            found = file_sha256(part) if sha256 else None
            if sha256 is None or found == sha256:
                fsync(part)
                os.replace(part, target)
                return target
            part.unlink(missing_ok=True)
            if not resumed:
                break
    raise ValueError(
        f"{label or url}: the download from {url} has SHA-256 {found}, expected {sha256}; the file was removed, "
        f"run the command again to fetch it anew (check CLIPDALLE_OPENAI_URL if it is set)"
    )


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Any:
    """An exclusive lock on `lock_path` for the block (where the OS offers flock; nothing elsewhere)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fetch(url: str, part: Path, label: str) -> bool:
    """Writes the bytes of `url` to `part`, continuing an existing part; True when it resumed one."""
    from tqdm import tqdm

    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # the part is already whole (or longer than the file): start over
            part.unlink()
            return _fetch(url, part, label)
        raise ValueError(f"{label}: download from {url} failed (HTTP {error.code} {error.reason})") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ValueError(
            f"{label}: cannot reach {url} ({reason}); check the network, or {download_hint(label)}"
        ) from None
    with response:
        resumed = offset > 0 and response.status == 206
        if not resumed:
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        progress = tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=label, disable=None)
        try:
            with open(part, "ab" if resumed else "wb") as handle:
                for block in iter(lambda: response.read(CHUNK_BYTES), b""):
                    handle.write(block)
                    progress.update(len(block))
        except (urllib.error.URLError, OSError) as error:  # cut off: what arrived stays in the part, resumed later
            raise ValueError(
                f"{label}: the download from {url} was cut off ({error}); run the command again to resume it"
            ) from None
        finally:
            progress.close()
    if total is not None and part.stat().st_size < total:
        raise ValueError(f"{label}: the download from {url} ended early; run the command again to resume it")
    return resumed


# ------------------------------------------------------------------------------------------ Hub files


def _hub_download(repo: str, filename: str, *, local_only: bool) -> Path:
    """One file of a Hub repo from huggingface_hub's cache, fetched unless `local_only`. Reads HF_ENDPOINT and
    HF_HUB_CACHE at each call (huggingface_hub reads them once, at import)."""
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(
        repo,
        filename,
        local_files_only=local_only,
        endpoint=os.environ.get("HF_ENDPOINT") or None,
        cache_dir=hf_cache_dir(),
        library_name="clipdalle",
    )
    return Path(path)


def _hub_download_available(repo: str) -> None:
    import importlib.util

    if importlib.util.find_spec("huggingface_hub") is None:
        raise ValueError(f"{repo}: model names need huggingface_hub: pip install 'clipdalle[hub]'")


def hf_cache_dir() -> str | None:
    """huggingface_hub's cache as the environment names it now (None: its default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _hub_files(repo: str, required: tuple[str, ...], optional: tuple[str, ...], *, name: str, fetch: str) -> Path:
    """Fetches `required` (each entry: alternatives separated by '|', the first found wins) and whichever of
    `optional` the repo has; returns the path of the first required file. Cached files are used without a
    network call unless fetch="refresh"."""
    _hub_download_available(repo)
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    def get(filename: str, local_only: bool) -> Path | None:
        try:
            return _hub_download(repo, filename, local_only=local_only)
        except LocalEntryNotFoundError:
            if local_only:  # not cached
                return None
            raise  # online: the Hub could not be reached and the file is not cached
        except EntryNotFoundError:  # the repo has no such file (a 404 for this file)
            return None

    def fetch_all(local_only: bool) -> list[Path] | None:
        paths = []
        for alternatives in required:
            found = next((p for p in (get(f, local_only) for f in alternatives.split("|")) if p is not None), None)
            if found is None:
                return None
            paths.append(found)
        for filename in optional:
            get(filename, local_only)
        return paths

    paths = None if fetch == "refresh" else _quietly(fetch_all, True, repo)
    if paths is None:
        if fetch == "never" or offline():
            raise ValueError(f"{name}: not in the Hugging Face cache and offline mode is on; {download_hint(name)}")
        paths = _quietly(fetch_all, False, repo)
    if paths is None:
        wanted = " and ".join(" or ".join(alternatives.split("|")) for alternatives in required)
        raise ValueError(f"{name}: the Hugging Face repo {repo} has no {wanted}; is it a CLIP model repo?")
    return paths[0]


def _quietly(fetch_all: Any, local_only: bool, repo: str) -> Any:
    """Runs `fetch_all` turning huggingface_hub's network and access errors into one-line ValueErrors."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    try:
        return fetch_all(local_only)
    except GatedRepoError:
        raise ValueError(f"{repo}: a gated Hugging Face repo; accept its terms on the Hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{repo}: no such local path, nor Hugging Face repo (a private one needs HF_TOKEN)") from None
    except OfflineModeIsEnabled:
        raise ValueError(f"{repo}: not cached and huggingface_hub is offline (HF_HUB_OFFLINE=1)") from None
    except (HfHubHTTPError, OSError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{repo}: cannot fetch from the Hugging Face Hub ({first})") from None


def _snapshot_files(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()]


def _weights_sha256(path: Path) -> str:
    """A Hub weights file's SHA-256: the name of its blob in huggingface_hub's cache (LFS files are stored under
    their SHA-256), else the hash of its bytes."""
    blob = path.resolve().name
    return blob if SHA256_PATTERN.fullmatch(blob) else file_sha256(path)


def _resolve_open_clip_repo(
    name: str, repo: str, text_cfg: dict[str, Any] | None, fetch: str, *, config_file: bool
) -> ModelFiles:
    """An open_clip repo: its weights (safetensors first), its open_clip_config.json when `config_file`, and a
    tokenizer: its own files, the repo open_clip's config names (hf_tokenizer_name), or OpenAI's BPE."""
    weights_alternatives = "|".join(OPEN_CLIP_WEIGHTS)
    if config_file:
        config = _hub_files(
            repo, ("open_clip_config.json", weights_alternatives), TOKENIZER_FILES, name=name, fetch=fetch
        )
        folder = config.parent
        text_cfg = (json.loads(config.read_text(encoding="utf-8")).get("model_cfg") or {}).get("text_cfg") or {}
        path, weights = folder, next(folder / f for f in OPEN_CLIP_WEIGHTS if (folder / f).is_file())
    else:  # an ARCH/PRETRAINED tag: the weights file, read with the architecture's config from our table
        weights = _hub_files(repo, (weights_alternatives,), TOKENIZER_FILES, name=name, fetch=fetch)
        path, folder = weights, weights.parent
    tokenizer = None
    if not any((folder / f).is_file() for f in ("vocab.json", "spiece.model", "tokenizer.json")):
        tokenizer_repo = (text_cfg or {}).get("hf_tokenizer_name")
        if tokenizer_repo:
            required = ("tokenizer.json|spiece.model",)
            tokenizer = _hub_files(tokenizer_repo, required, TOKENIZER_FILES, name=name, fetch=fetch).parent
        else:
            tokenizer = _hub_files(CLIP_BPE_REPO, CLIP_BPE_FILES, (), name=name, fetch=fetch).parent
    files = _snapshot_files(folder) + (_snapshot_files(tokenizer) if tokenizer else [])
    return ModelFiles(name, path, tokenizer=tokenizer, sha256=_weights_sha256(weights), files=files)


def _resolve_transformers_repo(name: str, fetch: str) -> ModelFiles:
    """A transformers CLIPModel / SiglipModel repo: config.json, weights (one file or safetensors shards),
    preprocessor_config.json and the tokenizer files it has."""
    config = _hub_files(name, ("config.json",), ("preprocessor_config.json", *TOKENIZER_FILES), name=name, fetch=fetch)
    folder = config.parent
    model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    if model_type not in ("clip", "siglip"):
        extra = " (SigLIP 2's NaFlex variant; its fixed-resolution repos load)" if model_type == "siglip2" else ""
        raise ValueError(
            f"{name}: a Hugging Face {model_type!r} model{extra}; expected a CLIPModel or SiglipModel repo"
        )
    index = _hub_files(name, (f"{HF_WEIGHTS_INDEX}|{'|'.join(HF_WEIGHTS)}",), (), name=name, fetch=fetch)
    weights = index
    if index.name == HF_WEIGHTS_INDEX:
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values()))
        weights = _hub_files(name, tuple(shards), (), name=name, fetch=fetch) if shards else index
    return ModelFiles(name, folder, sha256=_weights_sha256(weights), files=_snapshot_files(folder))


# ------------------------------------------------------------------------------------------ listing


def list_models() -> list[dict[str, Any]]:
    """Every name `models list` shows: OpenAI's, open_clip's tags, transformers repos (a few well-known ones and
    any other CLIP in the cache), each with where it comes from, whether all its files are cached, and its size on
    disk (a Hub repo's whole cache folder)."""
    table = open_clip_table()
    hub_sizes = _cached_repo_sizes()
    rows = []
    for name in OPENAI_MODELS:
        path = openai_path(name)
        rows.append(
            _row(name, "openai", path.is_file() and _is_cached(name), path.stat().st_size if path.is_file() else 0)
        )
    tag_repos = {entry["repo"] for entry in table["tags"].values()}
    for name, entry in table["tags"].items():
        size = hub_sizes.get(entry["repo"])
        rows.append(_row(name, "open_clip", size is not None and _is_cached(name), size or 0))
    others = sorted(repo for repo in hub_sizes if repo not in tag_repos and repo not in TRANSFORMERS_MODELS)
    for repo in [*TRANSFORMERS_MODELS, *others]:
        size = hub_sizes.get(repo)
        cached = size is not None and _is_cached(repo)
        if cached or repo in TRANSFORMERS_MODELS:  # other cached repos: only the CLIP models among them
            rows.append(_row(repo, "transformers", cached, size or 0))
    return rows


def _is_cached(name: str) -> bool:
    try:
        resolve(name, fetch="never")
    except ValueError:
        return False
    return True


def available_models() -> list[str]:
    """The model names `models list` shows (as openai/CLIP's clip.available_models, with more sources)."""
    table = open_clip_table()
    return [*OPENAI_MODELS, *table["tags"], *TRANSFORMERS_MODELS]


def _row(name: str, source: str, cached: bool, size: int) -> dict[str, Any]:
    return {"name": name, "source": source, "cached": cached, "size_bytes": size}


def _cached_repo_sizes() -> dict[str, int]:
    """{repo id: bytes on disk} of the model repos in huggingface_hub's cache (empty when it has none)."""
    try:
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound
    except ImportError:
        return {}
    try:
        info = scan_cache_dir(hf_cache_dir())
    except CacheNotFound:
        return {}
    return {repo.repo_id: repo.size_on_disk for repo in info.repos if repo.repo_type == "model"}


def format_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"
