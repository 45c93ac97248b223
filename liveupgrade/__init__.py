"""liveupgrade: move a running QEMU VM into a new QEMU binary on the same host."""

__version__ = "0.1.0"
