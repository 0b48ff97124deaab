"""The interactive segmentation network (DeepLabv3+ with SPM) and the click-by-click predictor."""
