"""`python -m training.evaluate ...`: NoC evaluation, history and plots (see training/evaluation/cli.py)."""
import sys

from training.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
