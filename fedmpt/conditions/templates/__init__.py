"""Versioned prompt templates of the two-stage conditions pipeline (``stage1_v1.txt``, ``stage2_v1.txt``)."""
