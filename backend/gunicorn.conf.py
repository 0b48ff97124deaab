"""Production server: `gunicorn -c backend/gunicorn.conf.py` from the repository root.

One worker holds one model; each worker keeps its own click sessions, so Label Studio's successive
clicks on an image should reach the same worker: keep GUNICORN_WORKERS=1 (the default) unless a
sticky load balancer is in front, and scale with threads (requests on different images run
concurrently; a session serialises its own clicks). No preload_app: CUDA does not survive fork,
every worker loads the model after forking.
"""
import os

wsgi_app = "backend.wsgi:app"
bind = os.environ.get("GUNICORN_BIND", f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '9090')}")
workers = int(os.environ.get("GUNICORN_WORKERS", "1"))
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "4"))
# A first click on a big image on CPU (download + model) can take seconds; Label Studio itself
# waits up to 100 s for /predict.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "120"))
graceful_timeout = 30
preload_app = False
max_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS", "0"))  # 0: never recycle (caches live)
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
# Gunicorn 27's runtime control socket (under ~/.gunicorn) is not used by this service.
control_socket_disable = True
