"""Export: a genome as a plain Hugging Face checkpoint (scales folded, verified) or a mergekit config.

`checkpoint` orchestrates an export and writes its side files; `providers` reads the sources' tensors (from
memory, or streamed from their safetensors files); `tensors` plans, folds and streams the weights; `verify`
checks the written folder (its tensors, its logits against the stitched model); `card` writes its README.md;
`mergekit` writes and reads mergekit passthrough configs of the same route; `gguf` writes the same model as one
GGUF file (F32, F16, BF16, Q8_0) for llama.cpp, checked through transformers' GGUF loader.
"""

from dfs_merge import lazy_exports

__all__ = ["export_genome", "export_checkpoint", "export_gguf", "verify_export", "write_mergekit_config",
           "import_mergekit"]
__getattr__ = lazy_exports(__name__, {"export_genome": "checkpoint", "export_checkpoint": "checkpoint",
                                      "export_gguf": "gguf",
                                      "verify_export": "verify",
                                      "write_mergekit_config": "mergekit", "import_mergekit": "mergekit"})
