"""SimClick's Label Studio ML backend: smart masks from keypoints, brush strokes and boxes.

`python -m backend` serves it (development server); production: `gunicorn -c backend/gunicorn.conf.py`.
Settings: backend/config.py (the backend's, as one object); every variable SimClick reads is declared
in model/settings.py (`python -m backend --help-env`).
"""
