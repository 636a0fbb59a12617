"""Test helpers: several nodes of one job on one machine (torch elastic agents on localhost)."""

from .cluster import LocalCluster

__all__ = ["LocalCluster"]
