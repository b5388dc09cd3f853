"""Export: a genome as a plain Hugging Face checkpoint (scales folded, verified) or a mergekit config."""

from dfs_merge import lazy_exports

__all__ = ["export_genome", "export_checkpoint", "write_mergekit_config", "import_mergekit"]
__getattr__ = lazy_exports(__name__, {"export_genome": "checkpoint", "export_checkpoint": "checkpoint",
                                      "write_mergekit_config": "mergekit", "import_mergekit": "mergekit"})
