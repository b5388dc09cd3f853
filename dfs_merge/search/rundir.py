"""The run directory (`out:`): what a run writes, and reading it back to resume.

```
config.yaml         the config as run
evals.jsonl         one line per evaluation, appended and fsynced the moment it finishes
checkpoint.json     the whole search state after the last finished generation (atomic)
best.genome.yaml    the best genome so far, with its scores
pareto/             nsga2: one genome file per member of the Pareto front
pareto.json         nsga2: the front as a table
history.png         best and mean score per generation
sources.json        the sources' content fingerprints: a resume on changed weights is refused
report.html         the run as one page for a browser (`dfs_merge.report`), rewritten at each checkpoint
tracking/           `tracking:` only: the tracker's run id (to resume it) and its local files (wandb/, mlruns/)
```

Nothing is pickled: every file is text (YAML or JSON) that a person can read.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import yaml

from dfs_merge.atomic import append_jsonl, read_jsonl, write_atomic
from dfs_merge.config import RESUMABLE_KEYS, RunConfig
from dfs_merge.errors import ConfigError, DfsMergeError
from dfs_merge.genome_files import CandidateGenome, save_genome
from dfs_merge.inputs import NoAliasDumper, read_json, read_yaml
from dfs_merge.outputs import check_output

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "dfs-merge/checkpoint@1"


class RunDir:
    """One run's folder; `open` checks it, the other methods read and write its files."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.evals = self.path / "evals.jsonl"
        self.docs = self.path / "docs.jsonl"  # racing's per-document results (`racing.py`)
        self.checkpoint = self.path / "checkpoint.json"
        self.best = self.path / "best.genome.yaml"
        self.pareto_dir = self.path / "pareto"
        self.pareto_json = self.path / "pareto.json"
        self.history = self.path / "history.png"
        self.sources = self.path / "sources.json"
        self.report = self.path / "report.html"
        self.started = False  # whether something was evaluated here before (set by `open`)
        self._logs: dict[Path, Any] = {}  # the open JSON-lines logs (evals.jsonl, docs.jsonl)

    def paths(self) -> dict[str, Path]:
        """Every file a run may write, by name."""
        return {
            "out": self.path,
            "config": self.config,
            "evals": self.evals,
            "docs": self.docs,
            "checkpoint": self.checkpoint,
            "best": self.best,
            "pareto": self.pareto_dir,
            "pareto_json": self.pareto_json,
            "history": self.history,
            "sources": self.sources,
            "report": self.report,
        }

    # ---- opening -----------------------------------------------------------------------
    @classmethod
    def open(cls, cfg: RunConfig, resume: bool) -> RunDir:
        """Check `cfg.out`: writable; empty unless resuming; the same config when resuming. A folder where
        nothing was evaluated yet (a run that failed at its start) counts as empty. Writes nothing."""
        rd = cls(cfg.out)
        path = rd.path
        check_output(path, kind="folder", force=True, inputs=cfg.sources, error=ConfigError, what="out:")
        try:
            existing = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        except OSError as err:
            raise ConfigError(f"out: {path} cannot be listed ({err.strerror or err})") from None
        # a run that stopped before its first evaluation computed nothing: it may start again, with any config
        started = bool(set(existing) - {"config.yaml", "sources.json", "report.html", "tracking"}
                       - {n for n in existing if n.startswith(".")})
        if started and not resume:
            raise ConfigError(
                f"out: {path} is not empty ({', '.join(existing[:3])}{', ...' if len(existing) > 3 else ''}); "
                "resume the run there (--resume) or choose another folder"
            )
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".probe."):
                pass
        except OSError as err:
            raise ConfigError(f"out: {path} is not writable ({err.strerror or err})") from None
        if resume and started and rd.config.is_file():
            rd._check_same_config(cfg)
        rd.started = started
        return rd

    def start(self, cfg: RunConfig, fingerprints: list[str | None]) -> None:
        """Write config.yaml and sources.json, once the run is known to start or continue (so that a refused
        resume leaves the folder as it was)."""
        write_atomic(self.config, yaml.dump(cfg.model_dump(mode="json"), Dumper=NoAliasDumper, sort_keys=False))
        write_atomic(self.sources, json.dumps([{"path": p, "fingerprint": f}
                                               for p, f in zip(cfg.sources, fingerprints, strict=True)], indent=1))

    def _check_same_config(self, cfg: RunConfig) -> None:
        """Refuse to resume with a config that would change what is computed."""
        old = read_yaml(self.config, ConfigError)
        new = cfg.model_dump(mode="json")
        defaults = type(cfg).model_fields
        for key in new:
            if key in RESUMABLE_KEYS:
                continue
            # a key the run's config lacks was added to dfs-merge since: the run used its default
            was = old[key] if key in old else _json_default(defaults[key].get_default(call_default_factory=True))
            if was != new[key]:
                raise ConfigError(
                    f"resume: {key} differs from the run in {self.path} ({was!r} vs {new[key]!r}); "
                    f"only {', '.join(sorted(RESUMABLE_KEYS - {'out'}))} may change"
                )

    def check_sources(self, paths: list[str]) -> list[str | None]:
        """The sources' content fingerprints (those sources.json recorded, where it did); a resumed run whose
        sources' weights changed since is refused (it would mix two models)."""
        from dfs_merge.models.metadata import check_same_sources

        recorded: list[str | None] = []
        if self.started and self.sources.is_file():  # a run that evaluated nothing recorded nothing to keep
            try:
                recorded = [e.get("fingerprint") for e in json.loads(self.sources.read_text())]
            except (OSError, ValueError, AttributeError, TypeError):
                recorded = []
        try:
            now = check_same_sources(paths, recorded, paths, f"the run in {self.path}")
        except DfsMergeError as err:
            raise ConfigError(f"resume: {err}; start a new run in another folder, or put the old weights back") from None
        return [was or is_ for was, is_ in zip(recorded + [None] * len(paths), now, strict=False)]

    # ---- evaluations -------------------------------------------------------------------
    def read_evals(self) -> list[dict[str, Any]]:
        """Every complete evaluation line; a truncated last line (a killed write) is cut off the file."""
        return read_jsonl(self.evals)

    def append_eval(self, record: dict[str, Any]) -> None:
        """Append one evaluation as a JSON line, flushed and fsynced before returning."""
        self._append(self.evals, record)

    def read_docs(self) -> list[dict[str, Any]]:
        """Every complete line of the racing log (per-document results of each candidate's stages)."""
        return read_jsonl(self.docs)

    def append_docs(self, record: dict[str, Any]) -> None:
        """Append one stage's per-document results of one candidate, flushed and fsynced before returning."""
        self._append(self.docs, record)

    def _append(self, log: Path, record: dict[str, Any]) -> None:
        if log not in self._logs:
            self._logs[log] = open(log, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        append_jsonl(self._logs[log], record)

    def close(self) -> None:
        """Close the evaluation logs."""
        for f in self._logs.values():
            f.close()
        self._logs = {}

    # ---- checkpoint --------------------------------------------------------------------
    def read_checkpoint(self) -> dict[str, Any] | None:
        """The last checkpoint, or None when the run has none yet."""
        if not self.checkpoint.is_file():
            return None
        state = read_json(self.checkpoint, ConfigError)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(f"{self.checkpoint}: not a {CHECKPOINT_FORMAT} checkpoint")
        return state

    def write_checkpoint(self, state: dict[str, Any]) -> None:
        """Replace the checkpoint atomically."""
        write_atomic(self.checkpoint, json.dumps({"format": CHECKPOINT_FORMAT, **state}, allow_nan=False))

    # ---- results -----------------------------------------------------------------------
    def write_best(self, genome: CandidateGenome) -> None:
        """Write the best genome (with its scores) atomically."""
        save_genome(genome, self.best)

    def write_pareto(self, members: list[tuple[CandidateGenome, dict[str, Any]]]) -> list[Path]:
        """Write the front: pareto/NN-<hops>hops-<key>.genome.yaml per member and pareto.json; stale files go."""
        self.pareto_dir.mkdir(exist_ok=True)
        files, rows = [], []
        for i, (genome, row) in enumerate(members):
            path = self.pareto_dir / f"{i:02d}-{row['hops']}hops-{row['key']}.genome.yaml"
            save_genome(genome, path)
            files.append(path)
            rows.append({**row, "file": str(path.relative_to(self.path))})
        for old in self.pareto_dir.glob("*.genome.yaml"):
            if old not in files:
                old.unlink()
        write_atomic(self.pareto_json, json.dumps(rows, indent=1, allow_nan=False))
        return files

    def plot_history(self, history: list[dict[str, Any]]) -> Path | None:
        """Draw best and mean score per generation into history.png (atomically; nothing when no history)."""
        from dfs_merge.plots import history_png

        return history_png(history, self.history)


def _json_default(value: Any) -> Any:
    """A config field's default as `model_dump(mode="json")` writes it."""
    from pydantic import TypeAdapter

    return TypeAdapter(Any).dump_python(value, mode="json")
