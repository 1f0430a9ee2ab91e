"""The library behind `aid metrics` (files.py: one image scored against its reference) and `aid models eval`
(backbone.py: a backbone's validation loss and FID); the metrics themselves are in metrics/."""
