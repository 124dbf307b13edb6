"""The web server: the meme-finder page, its JSON API and an OpenAI-compatible images API (FastAPI).

    from clipdalle.serve import ServeSettings, create_app, load_models
    app = create_app(load_models("runs/demo"), ServeSettings(api_key="secret"))

Needs the `serve` extra (fastapi, uvicorn, python-multipart); nothing outside this package imports FastAPI.
"""

from .app import create_app, uvicorn_options
from .models import ServeModels, ServeSettings, load_models

__all__ = ["ServeModels", "ServeSettings", "create_app", "load_models", "uvicorn_options"]
