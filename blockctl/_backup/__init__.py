"""Backups, as a package: the repository on disk (``store``), its keys (``crypto``), the
per-repository checkpoints in QEMU (``checkpoints``, pure), the NBD reader (``reader``) and the
operations that tie them to a running VM (``operations``).

Private: the public names are re-exported by :mod:`blockctl.backup`. Nothing here imports
from ``blockctl._cli``; ``store``, ``crypto`` and ``checkpoints`` import nothing that talks
to QEMU.
"""
