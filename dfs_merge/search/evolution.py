"""The search loop: ask the algorithm, evaluate through the ledger, tell it, checkpoint; then the final choice.

Every candidate is repaired to meet the hop constraints before it is evaluated, generation 0 always
holds the seeds, and a genome whose canonical key was already evaluated is not evaluated again.

Determinism: all the algorithm's randomness comes from the run's own Python and numpy random states
(`state.RunRandom`), active only while the algorithm draws (never while a candidate is evaluated) and
saved in every checkpoint. Results are matched to candidates by key, so the order in which parallel
workers finish changes nothing. A run killed at any moment and resumed reaches the same result as one
that was never interrupted, and re-uses every evaluation already in evals.jsonl.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from deap import tools

from dfs_merge.atomic import NO_SPACE
from dfs_merge.config import RacingConfig, RunConfig
from dfs_merge.errors import ConfigError, DfsMergeError, FitnessError, GenomeError, one_line
from dfs_merge.evaluation import Evaluation
from dfs_merge.genome import Genome
from dfs_merge.genome_files import CandidateGenome, genome_from_dict, genome_to_dict
from dfs_merge.merging.recipe import initial_recipe
from dfs_merge.models.metadata import layer_counts
from dfs_merge.report import LiveReport
from dfs_merge.route import MAX_SLOTS
from dfs_merge.search import selection
from dfs_merge.search.algorithms import algorithm_class
from dfs_merge.search.backends import (
    Evaluator,
    GenomeEvaluator,
    LazyEvaluator,
    ModelEvaluator,
    check_ray_address,
    make_evaluator,
)
from dfs_merge.search.ledger import Ledger, finite
from dfs_merge.search.operators import member, repair, restore_members, same_key
from dfs_merge.search.rundir import RESTART_HINT, RunDir, racing_as_recorded, search_settings
from dfs_merge.search.state import RunRandom
from dfs_merge.search.tracking import Tracking

"""The errors of a full disk (or quota)."""
PLOT_EVERY_S = 60.0  # history.png is redrawn after a generation when this long has passed (and at the end)


@dataclass
class RunResult:
    """What a run produced (also on disk under `out`)."""

    best: CandidateGenome
    best_eval: Evaluation
    test_eval: Evaluation | None
    pareto: list[tuple[CandidateGenome, Evaluation]]
    out: Path
    paths: dict[str, Path]
    generations: int
    evaluations: int
    cache_hits: int
    errors: int
    recovered: int
    history: list[dict[str, Any]] = field(default_factory=list)


class Evolution:
    """One run's search state and its generation loop."""

    def __init__(self, cfg: RunConfig, template: CandidateGenome, rundir: RunDir, evaluator: Evaluator,
                 log: Callable[[str], Any] = print, progress: bool = True,
                 fingerprints: Sequence[str | None] = (), tracking: Tracking | None = None):
        self.cfg = cfg
        self.rundir = rundir
        self.log = log
        self.tracking = tracking or Tracking()  # the experiment tracker (`tracking:`), or none
        self.ledger = Ledger(rundir, evaluator, cfg.objectives, progress, self.tracking)
        self.algo = algorithm_class(cfg.algorithm)(cfg, template, self.ledger.known)
        if isinstance(cfg.racing, RacingConfig):
            self.start_race(cfg.racing)
        self.racing_undecided = cfg.racing == "auto"  # decided before the first generation this process runs
        self.rng = RunRandom(cfg.seed)
        self.hof = tools.HallOfFame(1, similar=same_key)
        self.generation = -1
        self.recovered = 0
        self.history: list[dict[str, Any]] = []
        self.report: dict[str, Evaluation] = {}  # held-out scores of the best (and the front)
        self.val: dict[str, Evaluation] = {}  # validation scores of the final shortlist (select_tasks)
        self.chosen: dict[Any, Any] = {}  # the final choice on validation: "best", and each front hop count
        self.finished = False
        self.fingerprints = tuple(fingerprints)  # of the sources, written into the genome files
        self._plotted = time.monotonic()
        self.live_report = LiveReport(rundir.path, log)

    # ---- the loop ------------------------------------------------------------------------
    def run(self) -> None:
        """Generations from the one after the checkpoint up to `cfg.generations`."""
        if self.generation >= 0:
            self.log(f"resuming after generation {self.generation} ({self.ledger.counters['evaluations']} "
                     f"evaluations; {self.recovered} more recovered from {self.rundir.evals.name})")
        for gen in range(self.generation + 1, self.cfg.generations + 1):
            if self.racing_undecided:
                self.decide_racing()
            t0 = time.perf_counter()
            with self.rng.active():
                asked = self.algo.ask(gen)
            # generation 0 opens with the seeds (each source unchanged, seed_routes): racing never stops them
            seeds = len(self.algo.template.seeds(self.cfg.seed_routes)[: self.cfg.population]) if gen == 0 else 0
            incumbents = [ind.key for ind in asked[:seeds]]
            self.ledger.evaluate(asked, gen, self.cfg.generations, self.algo.race_references(), incumbents)
            with self.rng.active():
                seen = self.algo.tell(gen, asked)
            self.after_generation(gen, seen, time.perf_counter() - t0)

    def start_race(self, racing: RacingConfig) -> None:
        """Race each generation's new candidates (`search/racing.py`)."""
        from dfs_merge.search.racing import Race

        self.ledger.race = Race(racing, self.rundir, self.cfg.split_tasks("dev")[0], self.cfg.split_guards("dev"),
                                self.algo.race_cut(), "hops" in self.cfg.objectives, self.log)

    def decide_racing(self) -> None:
        """`racing: auto`: race or not by the dev tasks' sizes (`auto_racing`), the same choice on every resume;
        a race started here takes what a killed run logged."""
        from dfs_merge.search.racing import auto_racing

        self.racing_undecided = False
        racing, why = auto_racing(self.ledger.evaluator.documents())
        self.log(why)
        if racing is not None:
            self.start_race(racing)
            self.ledger.race.recover(self.rundir.read_docs())

    def after_generation(self, gen: int, seen: list[Any], seconds: float) -> None:
        """Update hall of fame and front, history, best genome, checkpoint; print the summary line."""
        self.hof.update(seen)
        if self.algo.front is not None:
            self.algo.front.update([i for i in seen if self.ledger[i.key].ok])
        best_ev = self.ledger[self.hof[0].key]
        ok = [e.score for e in (self.ledger[i.key] for i in self.algo.population) if e.ok]
        mean = sum(ok) / len(ok) if ok else None
        counters = self.ledger.counters
        self.history.append({
            "generation": gen, "best": best_ev.score, "best_hops": best_ev.hops, "gen_best": max(ok) if ok else None,
            "mean": mean, **counters, "seconds": round(seconds, 3),
        })
        self.generation = gen
        self.write_results(plot=time.monotonic() - self._plotted > PLOT_EVERY_S)  # a long run's picture stays fresh
        self.tracking.generation(self.history[-1])
        mean_text = f"{mean:.4f}" if mean is not None else "n/a"
        lost = self.ledger.lost_now
        lost_text = f"  lost {len(lost)} to infrastructure faults (not scored)" if lost else ""
        if "documents" in counters:  # racing
            lost_text += f"  documents {counters['documents']}  stopped early {counters['stopped']}"
        self.log(
            f"gen {gen}/{self.cfg.generations}  best {best_ev.score:.4f} ({best_ev.hops} hops)  mean {mean_text}  "
            f"evals {counters['evaluations']}  cache hits {counters['cache_hits']}  errors {counters['errors']}  "
            f"{seconds:.1f}s{lost_text}"
        )

    # ---- results -------------------------------------------------------------------------
    def member(self, genome: CandidateGenome) -> Any:
        """An evaluated genome as a member of the hall of fame, the front or the final choice."""
        return member(genome, self.algo.fitness_cls, self.ledger.objectives_of)

    def best(self) -> Any:
        """The best member: the final choice on validation once made, else the best dev score."""
        return self.chosen.get("best", self.hof[0])

    def scored(self, m: Any) -> CandidateGenome:
        """The member's genome with its dev (and validation, held-out) scores attached."""
        scores = {"dev": self.ledger[m.key].summary()}
        for split, known in (("val", self.val), ("test", self.report)):
            if m.key in known:
                scores[split] = known[m.key].summary()
        return replace(m.genome, scores=scores, fingerprints=self.fingerprints)

    def front(self) -> list[Any]:
        """The Pareto front, fewest hops first; after the final choice, its member at each hop count."""
        if self.chosen:
            return [self.chosen[h] for h in sorted(k for k in self.chosen if k != "best")]
        if self.algo.front is None:
            return []
        return sorted(self.algo.front, key=lambda m: (self.ledger[m.key].hops, -self.ledger[m.key].score, m.key))

    def write_results(self, plot: bool) -> None:
        """best.genome.yaml, the front (where the algorithm has one), history.png if `plot`, the checkpoint,
        report.html (when slow to write, only if `plot`)."""
        self.rundir.write_best(self.scored(self.best()))
        if self.algo.front is not None:
            rows = []
            for m in self.front():
                ev = self.ledger[m.key]
                row: dict[str, Any] = {"key": m.key, "hops": ev.hops, "score": ev.score,
                                       "route": m.genome.text()}
                for name, known in (("val_score", self.val), ("test_score", self.report)):
                    if m.key in known:
                        row[name] = known[m.key].score
                rows.append((self.scored(m), row))
            self.rundir.write_pareto(rows)
        if plot:
            self.rundir.plot_history(self.history)
            self._plotted = time.monotonic()
        self.checkpoint()
        self.live_report.refresh(due=plot)

    # ---- checkpoint ----------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Write the whole search state atomically."""
        self.rundir.write_checkpoint({
            "generation": self.generation,
            "finished": self.finished,
            "algorithm": self.cfg.algorithm,
            "seed": self.cfg.seed,
            "search": search_settings(self.cfg),  # what a resume must not change (`RunDir.check_resumable`)
            **self.algo.state(),
            "hall_of_fame": [{"key": m.key, "genome": genome_to_dict(m.genome)} for m in self.hof],
            "rng": self.rng.to_json(),
            "counters": dict(self.ledger.counters),
            "lost": {k: ev.to_dict() for k, ev in self.ledger.lost.items()},  # not in evals.jsonl: see Ledger
            "history": self.history,
            "report": {k: ev.to_dict() for k, ev in self.report.items()},
            "report_split": self.cfg.split_signature("test"),
            "val": {k: ev.to_dict() for k, ev in self.val.items()},
            "val_split": self.cfg.split_signature("val"),
        })

    def restore(self, records: list[dict[str, Any]], state: dict[str, Any] | None) -> None:
        """Re-use logged evaluations and continue from the checkpoint (if any)."""
        done_gen = state["generation"] if state else -1
        self.recovered = self.ledger.recover(records, done_gen)
        if self.ledger.race is not None:
            self.ledger.race.recover(self.rundir.read_docs())
        if state is None:
            return
        self.ledger.lost = {k: Evaluation.from_dict(v) for k, v in (state.get("lost") or {}).items()
                            if k not in self.ledger.memo}
        if state.get("algorithm") != self.cfg.algorithm:
            raise ConfigError(f"resume: the checkpoint is of algorithm {state.get('algorithm')}, not {self.cfg.algorithm}")
        missing = [e["key"] for e in state["population"] + state["hall_of_fame"] if e["key"] not in self.ledger]
        if missing:
            raise ConfigError(f"resume: {self.rundir.evals} lacks the evaluation of {len(missing)} checkpointed genomes; "
                              f"{RESTART_HINT.format(checkpoint=self.rundir.checkpoint)}")
        self.generation = done_gen
        self.finished = bool(state.get("finished")) and done_gen >= self.cfg.generations
        self.rng = RunRandom.from_json(state["rng"])
        self.ledger.counters = dict(state["counters"])
        self.history = list(state["history"])
        # held-out and validation scores of another split (other tasks, limits, weights) are scored again
        if self.same_split(state, "test"):
            self.report = {k: Evaluation.from_dict(v) for k, v in state.get("report", {}).items()}
        if self.same_split(state, "val"):
            self.val = {k: Evaluation.from_dict(v) for k, v in state.get("val", {}).items()}
        self.algo.restore(state, self.ledger.objectives_of)
        restore_members(self.hof, [self.member(genome_from_dict(e["genome"], "checkpoint")) for e in state["hall_of_fame"]])

    def same_split(self, state: dict[str, Any], split: Literal["val", "test"]) -> bool:
        """Whether the checkpoint's validation or held-out scores were made on the split the config now names
        (a checkpoint written before splits were recorded whole: on the same task names)."""
        key = "val_split" if split == "val" else "report_split"
        if key in state:
            return state[key] == self.cfg.split_signature(split)
        tasks = self.cfg.select_tasks if split == "val" else self.cfg.report_tasks
        return state.get("select_tasks" if split == "val" else "report_tasks") == list(tasks)

    # ---- the final choice and the report -------------------------------------------------
    def score_split(self, fn: GenomeEvaluator, genomes: Sequence[CandidateGenome], known: dict[str, Evaluation], what: str,
                    tasks: Sequence[str], fallback: str = "") -> bool:
        """Score the genomes not yet in `known` with `fn` (validation or report tasks) into `known`; a failure is
        a warning line, not the end of the run. False when the tasks could not be scored. An evaluation lost to an
        infrastructure fault is not kept (a resumed run scores that genome again)."""
        todo = list({g.key(): g for g in genomes if g.key() not in known}.values())
        if not todo:
            return True
        self.log(f"scoring {len(todo)} genome(s) on the {what} tasks {', '.join(tasks)}")
        lost = 0
        try:
            with make_evaluator(self.cfg, fn) as ev:
                for key, e in ev.submit(todo):
                    if e.infrastructure:
                        lost += 1
                        continue
                    known[key] = finite(e)
        except DfsMergeError as err:
            self.log(f"warning: the {what} tasks could not be scored{', ' + fallback if fallback else ''}: {err}")
            return False
        if lost:
            self.log(f"warning: {lost} genome(s) lost to infrastructure faults on the {what} tasks (scored again on "
                     f"resume){', ' + fallback if fallback else ''}")
            return False
        return True

    def select(self, select_fn: GenomeEvaluator) -> None:
        """The final choice on validation (`selection.py`): the `select_top` best by dev overall, and at each
        hop count of a front, are scored on `select_tasks`; the best there replace dev's choice."""
        cfg = self.cfg
        genomes = {r["key"]: genome_from_dict(r["genome"], "evals.jsonl") for r in self.rundir.read_evals()}
        evaluated = [(genomes[k], ev) for k, ev in self.ledger.memo.items() if k in genomes]
        lists: dict[Any, list[selection.Candidate]] = {"best": selection.shortlist(evaluated, cfg.select_top)[None]}
        if self.algo.front is not None:
            hop_counts = {self.ledger[m.key].hops for m in self.algo.front}
            lists.update(selection.per_hop_count(evaluated, hop_counts, cfg.select_top))
        shortlisted = [c.genome for cs in lists.values() for c in cs]
        if not self.score_split(select_fn, shortlisted, self.val, "validation", cfg.select_tasks, "dev decides"):
            return
        chosen = selection.choose(lists, lambda g: self.val[g.key()])
        self.chosen = {k: self.member(c.genome) for k, c in chosen.items()}

    def finish(self, report_fn: GenomeEvaluator | None, select_fn: GenomeEvaluator | None = None) -> RunResult:
        """Make the final choice on validation (if configured), score the best genome (and the front) on the
        report tasks; write the final files."""
        cfg = self.cfg
        if select_fn is not None and cfg.select_tasks:
            self.select(select_fn)
        best = self.best()
        if report_fn is not None and cfg.report_tasks:
            targets = [best, *self.front()]
            self.score_split(report_fn, [m.genome for m in targets], self.report, "report", cfg.report_tasks)
        self.finished = True
        self.write_results(plot=True)
        self.tracking.best(self.rundir.best, self.scored(best).scores)
        best_ev = self.ledger[best.key]
        test, val = self.report.get(best.key), self.val.get(best.key) if self.chosen else None
        self.log(
            f"best: {best_ev.score:.4f} dev" + (f", {val.score:.4f} val" if val else "")
            + (f", {test.score:.4f} test" if test else "")
            + f", {best_ev.hops} hops: {best.genome.text()} -> {self.rundir.best}"
        )
        c = self.ledger.counters
        return RunResult(
            best=self.scored(best), best_eval=best_ev, test_eval=test,
            pareto=[(m.genome, self.ledger[m.key]) for m in self.front()],
            out=self.rundir.path, paths=self.rundir.paths(), generations=self.generation,
            evaluations=c["evaluations"], cache_hits=c["cache_hits"], errors=c["errors"], recovered=self.recovered,
            history=self.history,
        )


def search_template(cfg: RunConfig) -> CandidateGenome:
    """The empty genome of the search space a config describes: a route layout, or (with `merge:`) the
    initial parameter-space recipe."""
    layers = layer_counts(cfg.sources)
    if cfg.merge is None:
        if sum(layers) * cfg.repeats > MAX_SLOTS:
            raise ConfigError(f"repeats: {cfg.repeats} repeats of the sources' {sum(layers)} layers are "
                              f"{sum(layers) * cfg.repeats} slots, more than the {MAX_SLOTS} a genome may have")
        return Genome.empty(cfg.sources, layers, cfg.repeats, cfg.scaling, cfg.constraints)
    m = cfg.merge
    if len(set(layers)) != 1:
        raise ConfigError(f"merge: a parameter-space merge needs sources of one depth; their layers are {list(layers)}")
    try:
        return initial_recipe(cfg.sources, layers[0], m.method, m.base, m.layer_groups, m.init_weight,
                              m.init_density, normalize=m.normalize, lam=m.lam, rescale=m.rescale, seed=m.seed,
                              filters=tuple(m.filters), options=tuple(m.options.items()), ends=m.ends)
    except GenomeError as err:
        raise ConfigError(f"merge: {err}") from None


def run_evolution(
    cfg: RunConfig,
    *,
    resume: bool = False,
    evaluate: GenomeEvaluator | None = None,
    report_evaluate: GenomeEvaluator | None = None,
    select_evaluate: GenomeEvaluator | None = None,
    report: bool = True,
    progress: bool = True,
    log: Callable[[str], Any] = print,
) -> RunResult:
    """Run (or resume) the search a config describes, writing everything under `cfg.out`.

    `evaluate` replaces the real per-genome work (stitch + lm-eval) with any picklable
    `genome -> Evaluation` callable; `report_evaluate` likewise for the report tasks
    (by default the real work on the test split when `report_tasks` is set and
    `evaluate` is not given); the final choice on `select_tasks` uses the real work on the
    validation split, or `select_evaluate`. `report=False` skips scoring the winners on the report
    tasks and that choice. An algorithm that cannot work with the config's objectives is refused first.
    """
    algorithm_class(cfg.algorithm).check(cfg.objectives)
    template = search_template(cfg)
    try:
        seeds = template.seeds(cfg.seed_routes)
    except GenomeError as err:
        raise ConfigError(f"seed_routes: {err}") from None
    try:
        repair(seeds[0], random.Random(0))
    except GenomeError as err:
        raise ConfigError(f"constraints: no route over these sources meets them ({err})") from None
    if len(seeds) > cfg.population:
        raise ConfigError(f"seed_routes: {len(seeds)} distinct seeds (with the sources themselves) do not fit "
                          f"population {cfg.population}")
    check_task_names(cfg, evaluate, report_evaluate, select_evaluate, report)
    if cfg.ray:
        check_ray_address(cfg.ray)  # before anything is written: nothing listening there is one line, no wait
    if resume:
        cfg = racing_as_recorded(cfg)
    rundir = RunDir.open(cfg, resume)
    try:
        return _run(cfg, template, rundir, resume, evaluate, report_evaluate, select_evaluate, report, progress, log)
    except OSError as err:
        if err.errno not in NO_SPACE:
            raise
        # every write is atomic or an fsynced log line (a cut last line is dropped on resume): nothing is half done
        raise DfsMergeError(f"no space left on {rundir.path}; nothing was published (every finished evaluation is "
                            "logged): free some space and resume the run (--resume)") from None
    finally:
        rundir.close()  # the logs, and the run's lock


def check_task_names(cfg: RunConfig, evaluate: GenomeEvaluator | None, report_evaluate: GenomeEvaluator | None,
                     select_evaluate: GenomeEvaluator | None, report: bool = True) -> None:
    """Every task the run's own fitness will score (`tasks`, and with `report` `report_tasks` and `select_tasks`:
    those of the splits no evaluator was given for) found in the eval suites or lm-eval's registry before the
    search starts, without loading any: a misspelt `select_tasks` name is one line naming it, not a warning after
    the whole search. Nothing is checked where the caller's evaluator scores every split."""
    if evaluate is not None and not isinstance(evaluate, ModelEvaluator):
        return  # the report and selection tasks are scored only by evaluators the caller gives
    keys = [("tasks", list(cfg.tasks)),
            ("report_tasks", cfg.report_tasks if report and report_evaluate is None else []),
            ("select_tasks", cfg.select_tasks if report and select_evaluate is None else [])]
    if not any(names for _, names in keys):
        return
    from dfs_merge.fitness import tasks
    from dfs_merge.fitness.lm_eval_glue import offline_env, quiet_lm_eval

    offline_env()  # before lm-eval is imported, as the fitness does
    quiet_lm_eval()
    dirs = tasks.suite_dirs(cfg.eval_suites)
    for key, names in keys:
        try:
            tasks.check_task_names(names, dirs)
        except FitnessError as err:
            raise ConfigError(f"{key}: {err}") from None


def _run(cfg: RunConfig, template: CandidateGenome, rundir: RunDir, resume: bool, evaluate: GenomeEvaluator | None,
         report_evaluate: GenomeEvaluator | None, select_evaluate: GenomeEvaluator | None, report: bool,
         progress: bool, log: Callable[[str], Any]) -> RunResult:
    """`run_evolution` in an opened run folder."""
    fingerprints = tuple(rundir.check_sources(list(cfg.sources)))
    records = rundir.read_evals() if resume else []
    state = rundir.read_checkpoint() if resume else None
    if resume:
        rundir.check_resumable(cfg, state, records)
    if resume and state is None and not records:
        log(f"nothing to resume in {rundir.path}; starting a new run")
    fn: GenomeEvaluator = evaluate if evaluate is not None else ModelEvaluator(cfg, "dev")
    evaluator = LazyEvaluator(cfg, fn)
    tracking = Tracking(cfg, rundir, log)
    try:
        evo = Evolution(cfg, template, rundir, evaluator, log, progress, fingerprints, tracking)
        try:
            evo.restore(records, state)
        except (GenomeError, KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
            raise ConfigError(f"{rundir.checkpoint}: not a checkpoint this run can continue from ({one_line(err)}); "
                              f"{RESTART_HINT.format(checkpoint=rundir.checkpoint)}") from None
        took_over = rundir.start(cfg, list(fingerprints))
        if took_over:
            log(took_over)
        tracking.start(resume)  # before any evaluation: a tracker that cannot start stops the run here
        if not evo.finished:
            evo.run()
        evaluator.close()  # free the workers before the report starts its own
        if report_evaluate is None and isinstance(fn, ModelEvaluator) and cfg.report_tasks:
            report_evaluate = fn.for_split("test")  # in-process: shares the sources already loaded
        if select_evaluate is None and isinstance(fn, ModelEvaluator) and cfg.select_tasks:
            select_evaluate = fn.for_split("val")
        return evo.finish(report_evaluate if report else None, select_evaluate if report else None)
    except BaseException as err:
        tracking.close(err)  # the tracker's run: failed, or killed (Ctrl-C)
        raise
    finally:
        tracking.close()  # finished (nothing once closed)
        evaluator.close()
