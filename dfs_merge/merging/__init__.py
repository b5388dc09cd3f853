"""Parameter-space merging: merge methods on one tensor with mergekit's semantics (`methods`), the recipe
genome and its file format (`recipe`), and the resident model a recipe's merge is written into (`blend`)."""

from dfs_merge import lazy_exports

__all__ = ["METHODS", "Blender", "Recipe", "initial_recipe", "merged_model"]
__getattr__ = lazy_exports(__name__, {"METHODS": "methods", "Blender": "blend", "merged_model": "blend",
                                      "Recipe": "recipe", "initial_recipe": "recipe"})
