"""Diagnostics: ``gclip inspect`` (:mod:`.inspect`, :mod:`.plots`) and ``gclip bench`` (:mod:`.bench`)."""
