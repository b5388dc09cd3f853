"""mergekit configs, out and in: a route as a `passthrough` config, a recipe as a config of its method.

`common` holds the vocabulary both kinds share (model references, parameter settings, layer ranges, dtypes);
`passthrough` writes and reads routes (and a hybrid as a `mergekit-multi` config), `recipe` writes and reads
parameter-space merges. `write_mergekit_config` and `import_mergekit` take and give either kind; `precheck`
and `write` are the `mergekit` export format (`dfs_merge.export.formats`).
"""

from dfs_merge import lazy_exports

__all__ = ["import_mergekit", "import_passthrough", "import_recipe", "mergekit_slices", "precheck", "recipe_config",
           "write", "write_mergekit_config", "write_recipe_config"]
__getattr__ = lazy_exports(__name__, {
    "import_mergekit": "passthrough", "import_passthrough": "passthrough", "mergekit_slices": "passthrough",
    "precheck": "passthrough", "write": "passthrough", "write_mergekit_config": "passthrough",
    "import_recipe": "recipe", "recipe_config": "recipe", "write_recipe_config": "recipe",
})
