"""The web demo: ``multiway serve`` (FastAPI + uvicorn, one local HTML page, a JSON API under ``/api/``).

>>> from multiway.serve import ServeConfig, create_app
>>> app = create_app(ServeConfig(index="photos.index", captioner="runs/captioning", vqa="runs/vqa"))
"""

from .app import ApiError, MicroBatcher, ServeConfig, Service, create_app, decode_upload, serve

__all__ = ["ApiError", "MicroBatcher", "ServeConfig", "Service", "create_app", "decode_upload", "serve"]
