"""Packaged offline condition sets, one ``<dataset>.json`` per built-in dataset (see ``defaults_build``)."""
