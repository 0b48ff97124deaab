"""`python -m backend.jobs`: see backend/jobs/cli.py."""
import sys

from .cli import main

sys.exit(main())
