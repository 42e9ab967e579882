"""Several processes (torchrun's ranks) working on one command: see `world.py`."""

from .world import PeerLost, World, balanced_shares, current, joined, launched_processes

__all__ = ["PeerLost", "World", "balanced_shares", "current", "joined", "launched_processes"]
