"""Production server: `gunicorn -c backend/gunicorn.conf.py` from the repository root.

One worker holds one model; each worker keeps its own click sessions, so Label Studio's successive
clicks on an image should reach the same worker: keep GUNICORN_WORKERS=1 (the default) unless a
sticky load balancer is in front, and scale with threads (requests on different images run
concurrently; a session serialises its own clicks). No preload_app: CUDA does not survive fork,
every worker loads the model after forking.

Gunicorn puts its working directory (the repository root) on sys.path before it reads this file,
so the settings come from model/settings.py like everyone else's.
"""
from model.settings import (GUNICORN_BIND, GUNICORN_MAX_REQUESTS, GUNICORN_THREADS, GUNICORN_TIMEOUT,
                            GUNICORN_WORKERS, HOST, LOG_LEVEL, PORT)

wsgi_app = "backend.wsgi:app"
bind = GUNICORN_BIND.read() or f"{HOST.read()}:{PORT.read()}"
workers = GUNICORN_WORKERS.read()
worker_class = "gthread"
threads = GUNICORN_THREADS.read()
# A first click on a big image on CPU (download + model) can take seconds; Label Studio itself
# waits up to 100 s for /predict.
timeout = GUNICORN_TIMEOUT.read()
graceful_timeout = 30
preload_app = False
max_requests = GUNICORN_MAX_REQUESTS.read()  # 0: never recycle (caches live)
accesslog = "-"
errorlog = "-"
loglevel = LOG_LEVEL.read().lower()
# Gunicorn 27's runtime control socket (under ~/.gunicorn) is not used by this service.
control_socket_disable = True
