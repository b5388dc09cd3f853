"""Models: the sources loaded once (HF folders, GGUF files, packaged names), checked for a shared hidden space,
their layers pooled; the store of packaged models; `families/`, one small file per architecture."""

from dfs_merge import lazy_exports

__all__ = ["Source", "SourcePool", "read_config", "locate"]
__getattr__ = lazy_exports(__name__, {"Source": "sources", "SourcePool": "sources", "read_config": "sources",
                                      "locate": "sources"})
