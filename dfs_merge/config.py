"""The run config (YAML), read with `dfs_merge.inputs.read_yaml` (one-line errors).

The config is a pydantic model so that an unknown key or a wrong type is refused
with a message naming the field, before any model is loaded.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictBool,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from dfs_merge.errors import ConfigError, DfsMergeError, FitnessError
from dfs_merge.genome import MAX_SCALE, ConstraintsConfig
from dfs_merge.inputs import describe_validation_error, read_yaml
from dfs_merge.models.adapters import resolve_source
from dfs_merge.registry import ALGORITHMS, TRACKERS
from dfs_merge.route import MAX_SLOTS

# Sizes beyond which a run cannot be made (memory, processes, time), refused in one line when the config is read.
MAX_POPULATION = 10_000
MAX_GENERATIONS = 1_000_000
MAX_WORKERS = 1024
MAX_DOCUMENTS = 2**31 - 1
Documents = Annotated[int, Field(gt=0, le=MAX_DOCUMENTS)]
"""A number of documents per task (`limit`, `report_limit`, `select_limit`)."""


class MergeConfig(BaseModel):
    """A parameter-space search (config `merge:`): recipes of one method over the sources, with one weight
    (and density) per merged source and layer group. See `dfs_merge.merging`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    method: str  # a name in dfs_merge.merging.methods.METHODS
    base: int | None = Field(0, ge=0)  # the source whose deltas the others are taken against
    layer_groups: int = Field(1, ge=1, le=MAX_SLOTS)  # mergekit-evolve's layer granularity, as a number of groups
    ends: StrictBool = False  # the embeddings and the final norm + LM head get values (genes) of their own
    weight_range: tuple[float, float] = (0.0, 1.0)
    density_range: tuple[float, float] = (0.1, 1.0)
    init_weight: float | None = Field(None, allow_inf_nan=False)  # generation 0's centre; None: 1/n
    init_density: float = Field(1.0, gt=0, le=1)
    normalize: bool | None = None  # None: the method's default (mergekit's)
    lam: float = Field(1.0, alias="lambda", allow_inf_nan=False)
    rescale: bool | None = None  # DARE: restore each pruned delta's L1 norm (None: mergekit's default, on)
    seed: int = Field(0, ge=0)  # DARE's and DELLA's random masks
    # mergekit parameter filters whose tensors get weights (slerp: t) of their own, e.g. [self_attn, mlp]
    filters: list[str] = []
    options: dict[str, StrictBool | float] = {}  # the method's other parameters (gamma, epsilon, nuslerp_flatten, ...)

    @model_serializer(mode="wrap")
    def _without_empty_additions(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """`filters`, `options` and `ends` left out while empty or off: a run recorded before they existed
        resumes (its checkpoint's and evaluations' search config stays the same)."""
        return {k: v for k, v in handler(self).items() if not (k in ("filters", "options", "ends") and not v)}

    @model_validator(mode="after")
    def _ranges(self) -> MergeConfig:
        from dfs_merge.merging.recipe import check_magnitude  # torch-free

        lo, hi = self.weight_range
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ValueError(f"weight_range must be finite with low <= high, got {list(self.weight_range)}")
        try:
            for name, x in (("weight_range", lo), ("weight_range", hi), ("init_weight", self.init_weight),
                            ("lambda", self.lam)):
                if x is not None:
                    check_magnitude(name, x)
        except DfsMergeError as err:
            raise ValueError(str(err)) from None
        lo, hi = self.density_range
        if not (0 < lo <= hi <= 1):
            raise ValueError(f"density_range must satisfy 0 < low <= high <= 1, got {list(self.density_range)}")
        return self

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from dfs_merge.merging.methods import METHODS, unknown_method  # torch-free: the registry only

        if v not in METHODS:
            raise ValueError(unknown_method(v))
        return v


class RacingConfig(BaseModel):
    """Candidates raced on nested prefixes of the same dev documents (`dfs_merge/search/racing.py`).

    A generation's new candidates are scored on the first `stages[0]` of each task's documents, then the ones
    that can still matter on up to `stages[1]`, ..., the last stage being all of them. A candidate stops when
    the paired bound says, at `confidence`, that enough others beat it for it not to matter to the algorithm
    (see the module), on the statistic `bound_by` names: `probability` (each task scored by accuracy counted as
    the mean probability of the right answer, a low-variance measure of the same answers) or `metric` (the
    tasks' own metrics). `keep` (below 1) also stops all but the best `keep` fraction of a stage's candidates,
    with no such guarantee, ranked by `keep_by`: `probability` (as above) or `score` (the prefix score itself).
    """

    model_config = ConfigDict(extra="forbid")

    stages: list[float] = Field([0.2, 1.0], min_length=1)
    confidence: float = Field(0.95, gt=0.5, lt=1)
    keep: float = Field(1.0, gt=0, le=1)
    keep_by: Literal["probability", "score"] = "probability"
    bound_by: Literal["probability", "metric"] = "probability"

    @model_validator(mode="after")
    def _nested(self) -> RacingConfig:
        s = self.stages
        if any(not (0 < x <= 1) for x in s) or any(b <= a for a, b in zip(s, s[1:], strict=False)) or s[-1] != 1:
            raise ValueError(f"racing.stages must rise strictly within (0, 1] and end at 1, got {s}")
        return self


class SearchConfig(BaseModel):
    """What a run computes: the sources, the genome space, the fitness, the algorithm and its seed.
    None of these may change when a run is resumed."""

    model_config = ConfigDict(extra="forbid")

    sources: list[str] = Field(min_length=1)
    repeats: int = Field(1, ge=1, le=MAX_SLOTS)
    scaling: Literal["slot", "transition", "none"] = "slot"
    constraints: ConstraintsConfig = ConstraintsConfig()
    # A parameter-space search instead of a data-flow one: the recipe space (absent: routes and scales).
    merge: MergeConfig | None = None
    # Routes put into generation 0 next to the sources themselves, in `dfs-merge show` text form
    # ("0:0-12, 0:14-29"): a hand-made frankenmerge, or a pruning heuristic's route, to start from.
    seed_routes: list[str] = []

    tasks: dict[str, float] = Field(min_length=1)
    metrics: dict[str, str] = {}
    # A guarded task is a constraint, not a term: {task: bound}. It adds nothing to the score while its metric
    # stays within the bound (<= for a lower-is-better metric, >= otherwise) and -weight x the excess beyond it.
    # Validation and report tasks take their dev task's guard (`x_val`, `x_test` <- `x_dev`), as for weights.
    guards: dict[str, float] = {}
    # Racing: `auto` (the default) races at the defaults where the dev set is large enough for the paired bound to
    # act (`search/racing.auto_racing`: every dev task with at least 20 documents in the first stage), else not;
    # a block (`{}` for every default) always races; `off` (or null) never: every candidate on every document.
    racing: RacingConfig | Literal["auto"] | None = "auto"
    # Documents per task: one number for all, or {task: number}; the same documents for every candidate.
    limit: Documents | dict[str, Documents] | None = None
    eval_suites: list[str] = []
    batch_size: int = Field(8, ge=1, le=2**16)
    max_length: int = Field(2048, ge=16, le=2**24)
    num_fewshot: int | None = Field(None, ge=0, le=10_000)
    prefix_cache_mb: float = Field(0, ge=0, le=2**30, allow_inf_nan=False)

    objectives: list[Literal["score", "hops"]] = ["score"]
    # a name in dfs_merge.registry.ALGORITHMS: ga | nsga2 | cmaes | random (the objectives an algorithm needs are
    # checked when the run starts: `Algorithm.check`)
    algorithm: str = "ga"
    population: int = Field(16, ge=2, le=MAX_POPULATION)
    seed: int = Field(0, ge=0, lt=2**32)  # numpy's RandomState takes no other seed
    crossover_prob: float = Field(0.7, ge=0, le=1)
    mutation_prob: float = Field(0.3, ge=0, le=1)
    bit_flip_prob: float | None = Field(None, gt=0, le=1)
    scale_sigma: float = Field(0.1, gt=0, allow_inf_nan=False)
    scale_range: tuple[float, float] = (0.5, 1.5)
    cma_sigma: float = Field(0.5, gt=0, allow_inf_nan=False)
    elite: int = Field(1, ge=0)
    tournament: int = Field(3, ge=2, le=MAX_POPULATION)
    # ga / nsga2 / random: a new candidate whose route was already evaluated is mutated again, up to this
    # many times, so that each generation spends its slots on new routes (0: keep such duplicates).
    resample_duplicates: int = Field(10, ge=0, le=1000)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: StrictBool = False  # only a YAML true/false: "yes" or 1 is refused, not read as true

    @field_validator("racing", mode="before")
    @classmethod
    def _racing_words(cls, v: Any) -> Any:
        # YAML reads a bare `off` as false; `on` (true) is a block of every default
        if v is False or v == "off":
            return None
        if v is True or v == "on":
            return {}
        if v is not None and v != "auto" and not isinstance(v, (dict, RacingConfig)):
            raise ValueError(f"must be auto, on, off or a block of racing settings ({{stages: [0.2, 1.0], ...}}), "
                             f"not {v!r}")
        return v


class RunOptions(BaseModel):
    """How and how long a run runs, and the scoring after its search: these may change on resume (a changed
    report or validation setting is scored again; nothing the search computed is)."""

    model_config = ConfigDict(extra="forbid")

    generations: int = Field(10, ge=0, le=MAX_GENERATIONS)
    report_tasks: list[str] = []
    report_limit: Documents | dict[str, Documents] | None = None  # for report_tasks; None: all documents
    # Final choice on a validation split the search never saw: the `select_top` best candidates by dev score
    # (per hop count on a front) are scored on `select_tasks` and the best there is chosen. Empty: dev decides.
    select_tasks: list[str] = []
    select_limit: Documents | dict[str, Documents] | None = None
    select_top: int = Field(3, ge=1, le=MAX_POPULATION)
    # Evaluation workers. None: 1 on cpu; with device cuda, one per visible GPU (process pool), or as many as the
    # Ray cluster's GPUs hold at gpus_per_worker each (ray:).
    workers: int | None = Field(None, ge=1, le=MAX_WORKERS)
    ray: str | None = None
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    gpus_per_worker: float = Field(1.0, gt=0, allow_inf_nan=False)  # Ray with device cuda: num_gpus per actor
    # A genome whose worker, actor or node died is evaluated again on another worker, at most this many more
    # times; then it is lost for this generation ("infrastructure: ..."), never scored nor logged as evaluated.
    infrastructure_retries: int = Field(2, ge=0, le=100)
    threads: int | None = Field(None, ge=1, le=MAX_WORKERS)
    # An experiment tracker (dfs_merge.registry.TRACKERS: wandb | mlflow): each evaluation, each generation's
    # summary, the best genome. One that cannot start stops the run, unless tracking_optional (then: a warning).
    tracking: str | None = None
    tracking_project: str | None = None  # W&B project / MLflow experiment (default dfs-merge)
    tracking_uri: str | None = None  # W&B server / MLflow tracking URI (default: W&B's settings / the run folder)
    tracking_optional: StrictBool = False
    # Sources named as Hub models (org/name) that are not in the local Hugging Face cache may be downloaded.
    allow_download: StrictBool = False
    out: str = "runs/run"


class RunConfig(RunOptions, SearchConfig):
    """A run config: one flat YAML mapping holding a `SearchConfig` and its `RunOptions`."""

    @field_validator("objectives")
    @classmethod
    def _score_first(cls, v: list[str]) -> list[str]:
        if not v or v[0] != "score" or len(set(v)) != len(v):
            raise ValueError("must be [score] or [score, hops]")
        return v

    @field_validator("algorithm")
    @classmethod
    def _registered(cls, v: str) -> str:
        if v not in ALGORITHMS:
            raise ValueError(ALGORITHMS.unknown(v))
        return v

    @field_validator("tracking")
    @classmethod
    def _tracker(cls, v: str | None) -> str | None:
        if v is not None and v not in TRACKERS:
            raise ValueError(TRACKERS.unknown(v))
        return v

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.merge is not None:
            if self.merge.base is not None and self.merge.base >= len(self.sources):
                raise ValueError(f"merge.base: {self.merge.base} is not a source index (0..{len(self.sources) - 1})")
            from dfs_merge.merging.methods import METHODS

            if self.merge.base is None and METHODS[self.merge.method].needs_base:
                raise ValueError(f"merge.base: method {self.merge.method} needs a base model (a source index)")
            if self.seed_routes:
                raise ValueError("seed_routes: data-flow routes cannot seed a parameter-space search (merge:)")
        if self.elite >= self.population:
            raise ValueError(f"elite ({self.elite}) must be below population ({self.population})")
        lo, hi = self.scale_range
        if not (0 < lo <= hi <= MAX_SCALE):
            raise ValueError(f"scale_range must satisfy 0 < low <= high <= {MAX_SCALE:g}, got {list(self.scale_range)}")
        for key, names in (("limit", self.tasks), ("report_limit", self.report_tasks),
                           ("select_limit", self.select_tasks)):
            value = getattr(self, key)
            if isinstance(value, dict) and set(value) - set(names):
                raise ValueError(f"{key} names tasks it does not apply to: {sorted(set(value) - set(names))}")
        unguarded = set(self.guards) - set(self.tasks)
        if unguarded:
            raise ValueError(f"guards names tasks that are not in tasks: {sorted(unguarded)}")
        if not all(math.isfinite(b) for b in self.guards.values()):
            raise ValueError("guards: every bound must be a finite number")
        unknown = set(self.metrics) - set(self.tasks) - set(self.report_tasks) - set(self.select_tasks)
        if unknown:
            raise ValueError(f"metrics names tasks that are in none of tasks, report_tasks, select_tasks: "
                             f"{sorted(unknown)}")
        return self


    def split_guards(self, split: Literal["dev", "val", "test"]) -> dict[str, float]:
        """The guards of one split's tasks: dev's as given; a validation or report task takes its dev task's."""
        if split == "dev":
            return dict(self.guards)
        names = self.select_tasks if split == "val" else self.report_tasks
        dev_of = _dev_names(names, split)
        return {t: self.guards[dev_of[t]] for t in names if dev_of.get(t) in self.guards}

    def split_tasks(self, split: Literal["dev", "val", "test"]) -> tuple[dict[str, float], dict[str, str], Any]:
        """(task weights, metric overrides, limit) of one split: `dev` scores `tasks`, `val` `select_tasks`,
        `test` `report_tasks`.

        Validation and report tasks take the weight of the dev task whose name they are with `_dev` for
        `_val` / `_test` (`arith_test` <- `arith_dev`), else 1; metric overrides map the same way.
        Each split uses its own limit (`limit`, `select_limit`, `report_limit`; every document when unset).
        A limit is one number for all tasks or a mapping task -> number (tasks it omits use every document).
        """
        if split == "dev":
            return dict(self.tasks), {k: v for k, v in self.metrics.items() if k in self.tasks}, self.limit
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'dev', 'val' or 'test', got {split!r}")
        names, limit, key = ((self.select_tasks, self.select_limit, "select_tasks") if split == "val"
                             else (self.report_tasks, self.report_limit, "report_tasks"))
        if not names:
            raise FitnessError(f"the config lists no {key} to score on the {split} split")
        dev_of = _dev_names(names, split)
        tasks = {t: float(self.tasks.get(dev_of.get(t, ""), 1.0)) for t in names}
        metrics = {}
        for t in tasks:
            m = self.metrics.get(t) or self.metrics.get(dev_of.get(t, ""))
            if m:
                metrics[t] = m
        return tasks, metrics, limit

    def split_signature(self, split: Literal["val", "test"]) -> dict[str, Any] | None:
        """What a validation or report split's scores depend on (its tasks, weights, metrics, limit, guards),
        JSON-safe, or None when the config has no such split: a resumed run reuses its scores only when this is
        unchanged."""
        if not (self.select_tasks if split == "val" else self.report_tasks):
            return None
        tasks, metrics, limit = self.split_tasks(split)
        return {"tasks": tasks, "metrics": metrics, "limit": limit, "guards": self.split_guards(split)}


def _dev_names(names: list[str], split: str) -> dict[str, str]:
    """The dev task of each of a split's tasks named `x_<split>`: `x_dev`."""
    suffix = f"_{split}"
    return {t: t[: -len(suffix)] + "_dev" for t in names if t.endswith(suffix)}


RESUMABLE_KEYS = frozenset(RunOptions.model_fields)
"""The config keys that may differ between a run and its resumption."""


def load_config(path: str | Path, **overrides: Any) -> RunConfig:
    """Load and validate a run config; relative source and suite paths resolve against the config's folder
    when they exist there, else against the current directory."""
    data = read_yaml(path)
    data.update({k: v for k, v in overrides.items() if v is not None})
    label = str(path) if str(path).isprintable() else repr(str(path))  # a newline in the name would break the line
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{label}: {describe_validation_error(err)}") from None
    if cfg.merge is not None:  # a file's data-flow keys beside merge: would be ignored without a word
        for key in ("repeats", "scaling"):
            if key in data and getattr(cfg, key) != RunConfig.model_fields[key].default:
                raise ConfigError(f"{label}: {key}: a parameter-space search (merge:) has no data-flow slots or "
                                  f"scales; remove {key}")
    if cfg.allow_download:
        from dfs_merge.models.hub import allow_downloads

        allow_downloads()
    base = Path(path).resolve().parent
    cfg.sources = [resolve_source(s, base) for s in cfg.sources]
    cfg.eval_suites = [resolve_source(s, base) for s in cfg.eval_suites]
    return cfg
