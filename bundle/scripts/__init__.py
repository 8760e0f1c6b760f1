"""PR-INR bundle code: degradation simulation, metrics, networks and inference helpers.

Imported as ``scripts`` from the bundle root (MONAI Model Zoo convention: configs say
``"imports": ["$import scripts"]``).
"""
