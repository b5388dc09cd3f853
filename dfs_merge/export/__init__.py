"""Export: a genome as a plain Hugging Face checkpoint (scales folded, verified), a GGUF file or a mergekit config.

`formats` is the table of `dfs-merge export --format`s, each a module with a `precheck` and a `write`.
`checkpoint` orchestrates an HF export and writes its side files; `settings` reads a genome's export settings
and its chat template; `progress` shows the stages; `pool` checks the loaded sources (and merges a recipe's);
`providers` reads the sources' tensors (from memory, or streamed from their safetensors files); `tensors`
plans, folds and streams the weights; `verify` checks the written folder (its tensors, its logits against the
stitched model); `overlap` runs the stitched model's side of that check beside the writing where a core is free,
and fsyncs the shards in the background; `card` writes its README.md; `mergekit` writes and reads mergekit configs (a route as a
passthrough, a recipe as its method's); `gguf` writes the same model as one GGUF file (F32, F16, BF16, Q8_0)
for llama.cpp, checked through transformers' GGUF loader.
"""

from dfs_merge import lazy_exports

__all__ = ["export_genome", "export_checkpoint", "export_gguf", "verify_export", "write_mergekit_config",
           "import_mergekit"]
__getattr__ = lazy_exports(__name__, {"export_genome": "checkpoint", "export_checkpoint": "checkpoint",
                                      "export_gguf": "gguf",
                                      "verify_export": "verify",
                                      "write_mergekit_config": "mergekit", "import_mergekit": "mergekit"})
