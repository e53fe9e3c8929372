"""Plug-in loss terms for loss-based editors (ODEdit, ASAM)."""
