"""Fusion patterns of NormFace's agent layers (InnerDistance, Parameter agents, the combined net)."""

from __future__ import annotations
