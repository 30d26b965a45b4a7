"""unpacked: keep a CernVM-FS repository of unpacked container images in step with a recipe."""

__version__ = "0.1.0"
