"""A parameter-space candidate in memory: merged tensors written into one resident model's buffers.

`Blender` holds one model of the base's structure whose parameters start as the base's own tensors
(shared, not copied). `apply(recipe)` merges every tensor whose inputs vary between the sources and whose
recipe values changed since the last candidate, writing the result in place into that tensor's buffer
(allocated once, on the first write, and reused for every later candidate): a candidate costs no disk
write, no model rebuild, and no work for the layer groups a mutation left alone. Tensors that are the
same in every source (the untouched tensors of LoRA adapters over one base, or of full fine-tunes that froze
them) are never merged for a method with a base: their deltas are zero, so the merge is the base's tensor.

For the methods that prune (TIES, DARE, breadcrumbs, DELLA) it keeps, per merged tensor and merged source,
what no candidate changes (`methods.Delta`): DARE's L1 norm of the delta, and each value's rank in the
pruning's order (TIES's and breadcrumbs' magnitude order, DELLA's row rank), made on the first candidate that
prunes, so that a later candidate's TIES is elementwise passes only (the top-k at a new density is
`rank < k`; no selection, no sort), into buffers reused from tensor to tensor (`methods.Scratch`).
A rank costs 4 bytes a value of the tensors that differ from the base, per merged source: 216 MB for
SmolLM2-135M with the J adapter (56.6M adapted values); about 28 GB per merged source for a 7B (twice a
bfloat16 source's size, once a float32 one's). So what is kept is bounded (`keep`), by default by the bytes
the sources' weights take: keeping at most doubles a worker's memory. Tensors met once the bound is reached
are pruned from scratch each time (the same result, at the uncached cost); `keep=0` keeps nothing, nor does
a one-off merge (`recipe_model`).

Where the sources' vocabularies differ, one a prefix of the other (a LLaVA base, whose language model adds
`<image>`, beside its base LLM: `models.vocab`), the embeddings and the LM head are merged over the rows every
source holds for the same tokens (`VocabMap.rows`) and keep the base's (source 0's) rows past them; the export
writes this same merge (`recipe_model`).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from dfs_merge.errors import IncompatibleSources
from dfs_merge.merging.methods import RANKED, Delta, Method, Scratch, merge_deltas, tensor_generator
from dfs_merge.merging.recipe import Recipe
from dfs_merge.models.sources import Source, SourcePool


@dataclass
class _Tensor:
    """One merged tensor: its parameter in the resident model, the sources' tensors, its layer group input."""

    name: str
    param: torch.nn.Parameter
    inputs: list[torch.Tensor]  # what is merged: the sources' tensors (their first `rows` rows, where set)
    base: torch.Tensor  # source 0's whole tensor: the resident model's where nothing is merged
    rows: int | None  # the rows merged where the sources' vocabularies differ (`VocabMap.rows`); None: all
    layer: int | None  # the decoder layer it belongs to; None before the layers (pre) or after them (post)
    pre: bool
    shared: bool  # the same tensor in every source
    own: bool = False  # its buffer is the resident model's own (no longer the base's tensor)

    def buffer(self) -> torch.Tensor:
        """Where its merge is written: the resident parameter's rows that are merged. On the first write the
        parameter gets a buffer of its own, holding the base's rows past the merged ones."""
        if not self.own:
            self.param.data = torch.empty_like(self.base) if self.rows is None else self.base.clone()
            self.own = True
        return self.param.data if self.rows is None else self.param.data[:self.rows]


class Blender:
    """The resident model of one worker and what it needs to turn a recipe into merged weights, with the TIES
    magnitude ranks it reuses between candidates: at most `keep` bytes of them (default: the bytes of the
    sources' weights; see the module)."""

    def __init__(self, pool: SourcePool, keep: int | None = None):
        self.pool = pool
        self._deltas: dict[tuple[str, int, int], Delta] = {}  # (tensor, base, source)
        self._reserved = 0  # the bytes of the ranks allowed so far (each made on first use)
        self._scratch = Scratch()
        models = [s.model for s in pool.sources]
        states = [dict(m.named_parameters()) for m in models]
        names = list(states[0])
        rows = {n: pool.vocab.rows(n, pool.family) for n in names}
        for i, st in enumerate(states[1:], start=1):
            if list(st) != names:
                other = sorted(set(st) ^ set(names))
                raise IncompatibleSources(f"sources 0 and {i} differ in tensor names (e.g. {other[0] if other else '?'}); "
                                          "a parameter-space merge needs sources of one architecture")
            for n in names:
                if st[n][:rows[n]].shape != states[0][n][:rows[n]].shape:
                    raise IncompatibleSources(f"sources 0 and {i} differ in the shape of {n}: "
                                              f"{tuple(states[0][n].shape)} vs {tuple(st[n].shape)}")
        base = models[0]
        memo: dict[int, Any] = {id(p): torch.nn.Parameter(p.data, requires_grad=False) for p in base.parameters()}
        memo.update({id(b): b for b in base.buffers()})
        self.model = copy.deepcopy(base, memo).eval().requires_grad_(False)
        params = dict(self.model.named_parameters())
        layer_re = re.compile(re.escape(pool.family.layers_attr) + r"\.([0-9]+)\.")
        self.tensors: list[_Tensor] = []
        seen_layers = False
        for n in names:
            m = layer_re.match(n)
            seen_layers = seen_layers or m is not None
            inputs = [st[n] if rows[n] is None else st[n].detach()[:rows[n]] for st in states]  # a view: no copy
            shared = all(t.data_ptr() == inputs[0].data_ptr() or torch.equal(t, inputs[0]) for t in inputs)
            self.tensors.append(_Tensor(n, params[n], inputs, states[0][n], rows[n], int(m.group(1)) if m else None,
                                        not seen_layers, shared))
        self.layers = len(pool.base.layers)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for st in states for t in st.values()}
        self.keep = sum(storages.values()) if keep is None else keep
        self._last: dict[str, tuple[Any, ...]] = {}
        self.recomputed = 0  # tensors merged by the last `apply` (the rest kept their values)

    def group_of(self, t: _Tensor, recipe: Recipe) -> int:
        """The column of the recipe's rows a tensor takes (`Recipe.column`): its layer group's; the first before
        the layers, the last after."""
        return recipe.column(t.layer, after=not t.pre)

    @torch.no_grad()
    def apply(self, recipe: Recipe) -> PreTrainedModel:
        """Write `recipe`'s merge into the resident model (only what changed) and return the model."""
        if recipe.layers != self.layers or len(recipe.sources) != len(self.pool.sources):
            raise IncompatibleSources(f"the recipe is for {len(recipe.sources)} sources of {recipe.layers} layers, "
                                      f"the loaded pool has {len(self.pool.sources)} of {self.layers}")
        spec = recipe.spec
        self.recomputed = 0
        for t in self.tensors:
            if t.shared and spec.takes_base and recipe.base is not None:
                if t.own:  # a linear merge wrote here before: back to the base's own tensor
                    t.param.data = t.base
                    t.own = False
                self._last.pop(t.name, None)
                continue
            g = self.group_of(t, recipe)
            weights, densities = recipe.params(g, recipe.weight_class(t.name))
            signature = (recipe.method, recipe.base, recipe.normalize, recipe.lam, recipe.rescale,
                         recipe.seed, recipe.options, weights, densities)
            if self._last.get(t.name) == signature:
                continue
            buffer = t.buffer()
            merged = self._merge(t, recipe, weights, densities, buffer)
            if merged.data_ptr() != buffer.data_ptr():
                buffer.copy_(merged)
            self._last[t.name] = signature
            self.recomputed += 1
        return self.model

    def _merge(self, t: _Tensor, recipe: Recipe, weights: tuple[float, ...], densities: tuple[float, ...],
               out: torch.Tensor) -> torch.Tensor:
        spec = recipe.spec
        inputs = [t.inputs[s] for s in recipe.merged]
        base = t.inputs[recipe.base] if recipe.base is not None and spec.takes_base else None
        gen = tensor_generator(recipe.seed, t.name, t.inputs[0].device) if spec.random else None
        options = dict(recipe.options)
        if base is not None and spec.keeps_deltas:
            deltas = [self._delta(t, spec, recipe.base, s) for s in recipe.merged]
            return merge_deltas(spec, deltas, weights, base, densities=densities or None, normalize=recipe.normalize,
                                lam=recipe.lam, rescale=recipe.rescale, generator=gen, out=out, scratch=self._scratch,
                                options=options)
        return spec.merge(inputs, weights, base=base, densities=densities or None, normalize=recipe.normalize,
                          lam=recipe.lam, rescale=recipe.rescale, generator=gen, options=options)

    def _delta(self, t: _Tensor, method: Method, base: int, source: int) -> Delta:
        key = (t.name, base, source)
        if key not in self._deltas:
            need = t.inputs[0].numel() * 4 if method.sparsify in RANKED else 0  # a 4-byte rank a value
            ranked = need > 0 and self._reserved + need <= self.keep
            self._reserved += need if ranked else 0
            self._deltas[key] = Delta(t.inputs[source], t.inputs[base], ranked)
        return self._deltas[key]

    @property
    def kept_bytes(self) -> int:
        """The bytes the kept ranks hold now."""
        return sum(d.nbytes for d in self._deltas.values())


def recipe_model(recipe: Recipe, pool: SourcePool) -> PreTrainedModel:
    """A model of `recipe`'s merge over `pool` (its sources, loaded), with buffers of its own: for a hybrid's
    source and for the export. The pool's models are left unchanged."""
    return Blender(pool, keep=0).apply(recipe)


def merged_source(recipe: Recipe, pool: SourcePool, path: str) -> Source:
    """The merge as one source named `path`, with the base's family, folder (config, tokenizer), licence and, for a
    vision-language base, its vision tower and projector."""
    base = pool.base
    return Source(path, recipe_model(recipe, pool), base.family, base.folder, base.license, None, base.vision)


def merged_pool(recipe: Recipe, pool: SourcePool) -> SourcePool:
    """A pool whose one source is the merge (its route over it, all layers in order, is the merged model)."""
    return SourcePool([merged_source(recipe, pool, "recipe")], pool.tokenizer, [pool.paths[0]])
