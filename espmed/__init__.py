"""espmed: deploy ESP-MedSAM segmentation on scanner-side devices.

Importing the top-level package must stay cheap and torch-free: `espmed.runtimes` is embedded in
devices that do not install torch.
"""

__version__ = "0.1.0"
