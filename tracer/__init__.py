"""natrace: which native call sites of a live process hold unfreed memory."""

__version__ = "0.1.0"
