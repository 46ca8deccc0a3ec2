"""The device and precision names a user may choose, torch-free, so that every front end (CLI, Slicer Logic and
widget, batch script) lists the same choices even before torch is installed. ``device.py`` resolves them."""

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
