"""WSGI entry point for gunicorn: `gunicorn -c backend/gunicorn.conf.py` (loads `backend.wsgi:app`).

Each worker imports this after the fork and loads the model itself (never --preload: a CUDA
context does not survive fork).
"""
from .__main__ import configure_logging
from .app import create_app
from .config import Config

config = Config.from_env()
configure_logging(config.log_level)
app = create_app(config)
