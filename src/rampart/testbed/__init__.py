"""The virtual testbed: real Debian systems built from this checkout, installed and
booted under QEMU with OVMF (Secure Boot) and swtpm, driven by scenario tests.

`rootfs` builds the Core's root tree (debootstrap, configured as a CLIP OS device).
"""
