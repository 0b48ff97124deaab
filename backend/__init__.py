"""SimClick's Label Studio ML backend: smart masks from keypoints, brush strokes and boxes.

`python -m backend` serves it (development server); production: `gunicorn -c backend/gunicorn.conf.py`.
Settings: backend/config.py; every variable SimClick reads: `python -m backend --help-env`
(backend/settings.py).
"""
