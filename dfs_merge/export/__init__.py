"""Export: a genome as a plain Hugging Face checkpoint (scales folded, verified) or a mergekit config.

`checkpoint` orchestrates an export and writes its side files; `tensors` plans, folds and streams the
weights; `verify` checks the written folder against the stitched model; `card` writes its README.md;
`mergekit` writes and reads mergekit passthrough configs of the same route.
"""

from dfs_merge import lazy_exports

__all__ = ["export_genome", "export_checkpoint", "verify_export", "write_mergekit_config", "import_mergekit"]
__getattr__ = lazy_exports(__name__, {"export_genome": "checkpoint", "export_checkpoint": "checkpoint",
                                      "verify_export": "verify",
                                      "write_mergekit_config": "mergekit", "import_mergekit": "mergekit"})
