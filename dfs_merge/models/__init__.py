"""Models: the sources loaded once (HF folders, GGUF files, packaged names), checked for a shared hidden space,
their layers pooled (`sources`); their vocabularies, the same or one a prefix of the other's, and how their
rows line up (`vocab`); where a source's folder is and its config (`folders`); what a model folder says
about itself, read without loading it (`metadata`); other kinds of source plugged into the loader (`kinds`);
the store of packaged and converted models (`store`); `families/`, one small file per architecture."""

from dfs_merge import lazy_exports

__all__ = ["Source", "SourcePool", "read_config", "locate", "layer_counts"]
__getattr__ = lazy_exports(__name__, {"Source": "sources", "SourcePool": "sources", "read_config": "folders",
                                      "locate": "folders", "layer_counts": "metadata"})
