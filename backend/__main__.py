"""python -m backend [--host 127.0.0.1] [--port 9090]: serve the ML backend (development server).

For production use gunicorn: `gunicorn -c backend/gunicorn.conf.py` (see that file).
"""
from __future__ import annotations

import argparse
import logging
import sys

from werkzeug.serving import run_simple

from model.settings import SettingError, help_text

from .config import Config


def configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m backend", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9090)
    ap.add_argument("--help-env", action="store_true", help="print every environment variable SimClick reads (backend, worker, paths) and exit")
    args = ap.parse_args(argv)
    if args.help_env:
        print(help_text())
        return 0
    try:
        config = Config.from_env()
    except SettingError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    from .app import create_app  # the model stack (torch, seconds): --help-env and config errors answer without it
    try:
        app = create_app(config)
    except (FileNotFoundError, ValueError) as e:
        print(f"cannot load the model ({config.checkpoint}): {e}", file=sys.stderr)
        return 2
    backend = app.extensions["simclick"]
    logging.getLogger("backend").info("serving %s on http://%s:%d (device %s)", backend.version,
                                      args.host, args.port, getattr(backend.predictor, "device", "?"))
    run_simple(args.host, args.port, app, threaded=True, use_reloader=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
