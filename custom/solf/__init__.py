"""SOLF, the Specialized Organ Label Filter (``docs/solf.md``, SOLF method).

- :mod:`.features`: stage A, per-volume component cleaning and shape features in physical units.
- :mod:`.transforms`: the same as MONAI transforms, plus :class:`~.transforms.ApplySOLFDecisiond`.
- :mod:`.cohort`: stage B, robust per-organ fit, epsilon rule, 2-of-3 vote, actions.
- :mod:`.batch`: the dataset runner (local processes or a Dask cluster, resumable).
- :mod:`.reference`: versioned per-organ cohort references (what a bundle ships for per-scan QC).
- :mod:`.qc`: per-scan QC of a label map against a reference; SOLF QC of a folder of any segmenter's maps.
- ``python -m custom.solf run|features|fit|apply|report|reference|qc``.
"""
