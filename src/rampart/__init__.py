"""Rampart: signed A/B updates and a verified boot chain, after ANSSI's CLIP OS 5."""

__version__ = "0.1.0"
