"""influencerformer: query-based segmentation trained without Hungarian matching."""

__version__ = "0.1.0"
