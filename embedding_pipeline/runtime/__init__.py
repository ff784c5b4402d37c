"""The runtime layer: the state directory, managed processes, virtual environments and file locks.

Every other layer may use it; it imports nothing of the package above it except the settings model.
"""
