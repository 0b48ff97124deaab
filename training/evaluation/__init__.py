"""Evaluation of click-based segmentation with the standard robot-user protocol.

Modules: protocol (constants), samples (what one instance is), datasets (benchmark loaders),
clicker (robot user), metrics (IoU, NoC, NoF, mIoU@k), reference (oracle and GrabCut predictors),
predictors (--checkpoint -> factory + hash), runner (evaluation loop, workers), history (runs
database), tables / plots / report (output for people), cli (python -m training.evaluate).

The public names below are imported lazily, so worker processes only load what they use.
"""
from importlib import import_module

_EXPORTS = {
    "Click": "clicker", "RobotClicker": "clicker",
    "DATASETS": "datasets", "default_data_root": "datasets", "load_dataset": "datasets",
    "compare": "history", "list_runs": "history", "record_run": "history", "select_runs": "history",
    "iou": "metrics", "miou_curve": "metrics", "noc": "metrics", "summarize": "metrics",
    "PredictorSpec": "predictors", "checkpoint_hash": "predictors",
    "Protocol": "protocol",
    "GrabCutPredictor": "reference", "OraclePredictor": "reference",
    "DatasetResult": "runner", "InstanceResult": "runner", "evaluate_dataset": "runner", "run_instance": "runner",
    "LoadedSample": "samples", "Sample": "samples", "samples_from_arrays": "samples",
    "plot_versions": "plots", "plot_miou_curves": "plots", "plot_noc_by_version": "plots",
    "write_report": "report", "write_index": "report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
