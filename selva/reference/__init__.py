"""Reproduce the official reference vectors (``../shared/reference``) with our modules.

A reference directory holds a ``cases.json`` (which official call produced which output), an
``inputs.json`` (input formulas) and key manifests; weights come from a documented hash rule, so
only outputs are stored. ``selva check-reference DIR`` runs every case through the runners
registered in :mod:`selva.reference.runners`.
"""
