"""A local HTTP server for the download tests: OpenAI's URL scheme and what huggingface_hub asks of a Hub (HEAD and
GET on /ORG/NAME/resolve/REVISION/PATH, with X-Repo-Commit, ETag and Range), serving files from a folder. Nothing
here reaches beyond 127.0.0.1.

    server = FileServer(root)                 # root/openai/SHA/FILE, root/hub/ORG/NAME/PATH
    server.url                                # http://127.0.0.1:PORT
    server.requests                           # [(method, path, range header)], every request seen
    server.corrupt.add(path); server.cut_after[path] = bytes   # misbehave on purpose
"""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FileServer:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.requests: list[tuple[str, str, str | None]] = []
        self.corrupt: set[str] = set()  # URL paths whose bytes are served with one byte flipped
        self.cut_after: dict[str, int] = {}  # URL path -> bytes sent before the connection is dropped (once)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                server.respond(self, body=False)

            def do_GET(self) -> None:
                server.respond(self, body=True)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def file_for(self, path: str) -> tuple[Path | None, dict[str, str]]:
        """The file a URL path names and the Hub headers for it (an error code when there is none)."""
        parts = path.lstrip("/").split("/")
        if parts[:2] == ["clip", "models"]:
            return self.root / "openai" / "/".join(parts[2:]), {}
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = self.root / "hub" / parts[0] / parts[1]
            commit = hashlib.sha1(f"{parts[0]}/{parts[1]}".encode()).hexdigest()
            headers = {"X-Repo-Commit": commit}
            if not repo.is_dir():
                return None, {**headers, "X-Error-Code": "RepoNotFound"}
            file = repo / "/".join(parts[4:])
            return (file, headers) if file.is_file() else (None, {**headers, "X-Error-Code": "EntryNotFound"})
        return None, {}

    def respond(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = handler.path.split("?")[0]
        requested_range = handler.headers.get("Range")
        self.requests.append((handler.command, path, requested_range))
        file, headers = self.file_for(path)
        if file is None or not file.is_file():
            handler.send_response(404)
            for name, value in headers.items():
                handler.send_header(name, value)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        data = file.read_bytes()
        headers["ETag"] = f'"{hashlib.sha256(data).hexdigest()}"'
        if path in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = 0
        if requested_range and requested_range.startswith("bytes="):
            start = int(requested_range[len("bytes=") :].split("-")[0])
        if start >= len(data) and start > 0:
            handler.send_response(416)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        handler.send_response(206 if start else 200)
        for name, value in headers.items():
            handler.send_header(name, value)
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        handler.send_header("Content-Length", str(len(data) - start))
        handler.send_header("Accept-Ranges", "bytes")
        handler.end_headers()
        if not body:
            return
        payload = data[start:]
        cut = self.cut_after.pop(path, None) if handler.command == "GET" else None
        if cut is not None:  # send part of it, then drop the connection
            handler.wfile.write(payload[:cut])
            handler.wfile.flush()
            handler.close_connection = True
            handler.connection.shutdown(2)
            return
        handler.wfile.write(payload)

    def count(self, method: str | None = None) -> int:
        return sum(1 for seen, _, _ in self.requests if method is None or seen == method)


# ------------------------------------------------------------------------------------------ what is served


def tiny_bpe():
    """A CLIP BPE of 516 ids (bytes, bytes + </w>, two merges, the specials): what openai/clip-vit-base-patch32
    holds as vocab.json + merges.txt, in small."""
    from clipdalle.tokenizers.clip_bpe import ClipTokenizer, vocabulary_from_merges

    merges = [("a", "t</w>"), ("c", "at</w>")]
    return ClipTokenizer(vocabulary_from_merges(merges), merges)


def openai_style_weights(seed: int, vocab_size: int):
    """A tiny CLIP state dict in OpenAI's names (widths of 64 so that heads = width // 64), as OpenAI's .pt holds."""
    import torch

    from clipdalle.models.clip import CLIP, CLIPConfig

    torch.manual_seed(seed)
    config = CLIPConfig(
        embed_dim=16, image_size=32, vision_patch_size=16, vision_n_layer=1, vision_n_embd=64, vision_n_head=1,
        context_length=16, vocab_size=vocab_size, text_n_layer=1, text_n_embd=64, text_n_head=1,
    )  # fmt: skip
    return CLIP(config).state_dict()


def build_served_models(root: Path) -> dict[str, Path]:
    """Every layout a name resolves to, under root/openai and root/hub; returns the local files by role."""
    import json

    import torch
    from safetensors.torch import save_file

    from clipdalle.convert import open_clip_config
    from clipdalle.models.clip import CLIP, CLIPConfig

    bpe = tiny_bpe()
    local = {}
    bpe.save(root / "hub" / "openai" / "clip-vit-base-patch32")
    for name, seed in (("good", 1), ("other", 2)):
        path = root / "source" / f"{name}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(openai_style_weights(seed, bpe.vocab_size), path)
        sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        served = root / "openai" / sha256 / f"{name}.pt"
        served.parent.mkdir(parents=True, exist_ok=True)
        served.write_bytes(path.read_bytes())
        local[name] = path
    # an open_clip hf-hub repo: open_clip_config.json + open_clip_model.safetensors (tokenizer: OpenAI's BPE)
    torch.manual_seed(3)
    config = CLIPConfig(
        embed_dim=16, image_size=32, vision_patch_size=16, vision_n_layer=1, vision_n_embd=32, vision_n_head=2,
        context_length=16, vocab_size=bpe.vocab_size, text_n_layer=1, text_n_embd=32, text_n_head=2,
        activation="gelu", eos_id=2,
    )  # fmt: skip
    open_clip_repo = root / "hub" / "org" / "tiny-openclip"
    open_clip_repo.mkdir(parents=True)
    save_file(CLIP(config).state_dict(), str(open_clip_repo / "open_clip_model.safetensors"))
    (open_clip_repo / "open_clip_config.json").write_text(json.dumps(open_clip_config(config)))
    local["open_clip"] = open_clip_repo
    # a transformers SiglipModel repo with its SentencePiece tokenizer
    local["siglip"] = build_siglip_repo(root / "hub" / "org" / "tiny-siglip")
    return local


def build_siglip_repo(folder: Path) -> Path:
    import io

    import sentencepiece
    import torch
    import transformers

    text = ["a photo of a cat", "a dog in the snow", "a red circle", "a blue square", "two green triangles"] * 20
    model_file = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=model_file, vocab_size=60, model_type="unigram", pad_id=0,
        eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    torch.manual_seed(4)
    tower = {"hidden_size": 32, "intermediate_size": 72, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = transformers.SiglipConfig(
        text_config={**tower, "vocab_size": 64, "max_position_embeddings": 16},
        vision_config={**tower, "image_size": 32, "patch_size": 16},
    )
    transformers.SiglipModel(config).save_pretrained(folder)
    (folder / "spiece.model").write_bytes(model_file.getvalue())
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "SiglipTokenizer", "model_max_length": 16}')
    return folder
