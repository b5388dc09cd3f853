"""dfs-merge: evolve the data flow through the layers of existing language models."""
__version__ = "0.1.0"
