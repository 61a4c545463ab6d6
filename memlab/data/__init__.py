"""Corpora and text that work offline (no hub, no network)."""

from memlab.data.haystack import SYNTHETIC_SENTENCES, Text, TokenStream, load, real_text, token_stream

__all__ = ["SYNTHETIC_SENTENCES", "Text", "TokenStream", "load", "real_text", "token_stream"]
