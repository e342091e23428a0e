"""Frozen bodies: the backbone families, their weights, their preprocessing and their taps.

``registry`` names the families without importing torch (configuration validates names with
it); ``loader`` resolves and builds a body through the family that owns its name; ``body`` is
the frozen module every family's trunk is wrapped in; ``lite``, ``torchvision_models`` and
``timm_models`` are the families themselves.
"""
