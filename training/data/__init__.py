"""Training data for SimClick: instance sources, the weighted train/val mixture, augmentation to a
fixed crop, the torch Dataset/DataLoader, and click simulation (initial clicks, robot-user clicks on
errors, focus-view crops). See each module's docstring; the click convention is in
``click_simulation`` (model/clicks.py is the network's click inputs).

Typical use (training/train.py builds its own DataLoader over the dataset instead, with a sampler
that starts mid-epoch so a resumed run sees the batches the killed one would have)::

    from training.data import Mixture, default_sources, ClickSegDataset, make_loader
    mix = Mixture(default_sources(), seed=0)          # weights: DEFAULT_WEIGHTS
    train = ClickSegDataset(mix, "train", length=4000, seed=0)
    for epoch in range(E):
        for batch in make_loader(train, batch_size=8, num_workers=2, epoch=epoch):
            ...
"""
from .augment import AugmentConfig, Augmented, augment, color_jitter, eval_config
from .click_simulation import (NO_BOX, PAD_CLICK, InitialClickConfig, add_next_clicks, crop_resize, empty_clicks,
                               focus_view, last_clicks, next_clicks, num_clicks, padded_edt, random_clicks,
                               remap_boxes, remap_clicks, sample_boxes, sample_focus_boxes, sample_initial_clicks)
from .dataset import ClickSegDataset, collate, make_loader, worker_init_fn
from .mixture import Mixture, assign_splits, key_hash
from .catalog import DEFAULT_WEIGHTS, base_image_files, default_sources, source_from_spec
from .labelstudio import LabelStudioSource, ls_url_basename
from .sources import (AreaFilter, BenchmarkDataError, BSDSSource, COCOSource, Instance, InstanceSource, Item,
                      SBDSource, SODSource, assert_not_benchmark, decode_coco_segmentation, default_data_root,
                      read_bsds_segmentations, read_sbd_instances)

__all__ = [n for n in dir() if not n.startswith("_")]
