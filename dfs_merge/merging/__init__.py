"""Parameter-space merging: merge methods on one tensor with mergekit's semantics (`methods`, a registry of them
by name), the recipe genome and its file format (`recipe`), the resident model a recipe's merge is written into
(`blend`), and a recipe file as a source of the loader (`hybrid`, registered with it on import)."""

from dfs_merge import lazy_exports
from dfs_merge.merging import hybrid  # noqa: F401 - registers the recipe file as a kind of source

__all__ = ["METHODS", "Blender", "Method", "Recipe", "initial_recipe", "recipe_model", "register_method"]
__getattr__ = lazy_exports(__name__, {"METHODS": "methods", "Method": "methods", "register_method": "methods",
                                      "Blender": "blend", "recipe_model": "blend", "Recipe": "recipe",
                                      "initial_recipe": "recipe"})
