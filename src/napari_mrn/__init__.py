"""napari_mrn: the napari plugin of MRN (reader, writer, sample cases, diagnosis panel).

A thin GUI over :mod:`mrn_engine`'s public API.
"""

__version__ = "0.1.0"
