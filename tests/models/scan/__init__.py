"""Tests of qmamba.models.scan, one module per module (a package: the names stay unique)."""
