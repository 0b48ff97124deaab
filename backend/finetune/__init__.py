"""The fine-tuning job: pull -> evaluate the parent -> train -> evaluate the candidate -> register
-> promote (or keep, with the reason).

    result = run_finetune(project=3, job_id="train-p3-7", settings=FinetuneSettings.from_env())

Modules, one idea each:
  settings     FinetuneSettings: the FINETUNE_* variables, a job's overrides winning;
  job          the stages, in order (run_finetune), their progress and timings;
  evaluation   the robot user on the holdout and the benchmarks (stopped at IoU 0.90, the
               parent's results reused from the evaluation history, a pool of worker processes),
               the box prompt alone;
  decision     the promotion rule (pure): holdout better, no benchmark worse by more than the
               margin, the box prompt kept;
  eta          the time a running job has left;
  curve        the learning curve: NoC on unseen images after 25 / 50 / 100 labels
               (`python -m backend.finetune.curve`).

A project with too few usable annotations gets a job with status "skipped" and the reason
(`too_few`), without training.
"""
from .decision import BoxPaired, Paired, decide
from .eta import Eta
from .evaluation import benchmark_samples, image_digest
from .job import (Evaluation, FinetuneJob, decide_promotion, register, run_finetune, step_reporter, too_few,
                  train_candidate, train_config)
from .settings import FinetuneSettings

__all__ = ["BoxPaired", "Eta", "Evaluation", "FinetuneJob", "FinetuneSettings", "Paired", "benchmark_samples",
           "decide", "decide_promotion", "image_digest", "register", "run_finetune", "step_reporter", "too_few",
           "train_candidate", "train_config"]
