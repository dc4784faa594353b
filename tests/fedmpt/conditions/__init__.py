"""Tests of fedmpt.conditions (a package so that tests can import the stub server relatively)."""
