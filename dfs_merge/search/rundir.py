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
tracking/           `tracking:` only: the tracker's run id (to resume it) and its local files (wandb/, mlflow.db and mlartifacts/)
.dfs-merge.lock     the lock of the run writing here (`RunLock`): one writer per run folder
```

Nothing is pickled: every file is text (YAML or JSON) that a person can read.

A run folder is created empty or resumed: a folder that holds files but none of a run's own records
(sources.json, evals.jsonl, checkpoint.json) is refused, as is one another live run holds. A resume compares
the whole search config (`SearchConfig`) with the one the folder was made with: config.yaml, the search config
recorded in the checkpoint, and the digest each evaluation line carries (so that editing config.yaml with the
config does not rank scores of other documents together).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import yaml

from dfs_merge.atomic import append_jsonl, pid_alive, read_jsonl, write_atomic
from dfs_merge.config import RESUMABLE_KEYS, RunConfig
from dfs_merge.errors import ConfigError, DfsMergeError
from dfs_merge.genome_files import CandidateGenome, save_genome
from dfs_merge.inputs import NoAliasDumper, read_json, read_yaml
from dfs_merge.outputs import check_output

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the holder's pid decides (see `RunLock`)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "dfs-merge/checkpoint@1"
LOCK_NAME = ".dfs-merge.lock"
RUN_RECORDS = frozenset({"sources.json", "evals.jsonl", "checkpoint.json"})
"""The files only a run writes: a folder holding files but none of these is not a run's."""
RESTART_HINT = ("move {checkpoint} away to restart the run from its evals.jsonl (every logged evaluation is "
                "reused, none computed again)")


def search_settings(cfg: RunConfig) -> dict[str, Any]:
    """What a run computes (the `SearchConfig` keys), JSON-safe: recorded in its checkpoint."""
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in RESUMABLE_KEYS}


def search_digest(cfg: RunConfig) -> str:
    """A short digest of `search_settings` (keys at their default left out, so that a key added to dfs-merge
    later changes no run's digest): each evaluation line carries it."""
    fields = type(cfg).model_fields
    given = {k: v for k, v in search_settings(cfg).items()
             if fields[k].is_required() or v != _json_default(fields[k].get_default(call_default_factory=True))}
    if given.get("racing", "auto") is None:  # off: racing's default before `auto`, so runs made then keep their digest
        del given["racing"]
    return hashlib.sha1(json.dumps(given, sort_keys=True).encode()).hexdigest()[:12]


def racing_as_recorded(cfg: RunConfig) -> RunConfig:
    """The config a resumed run continues under: a run whose folder's config.yaml records racing off (what a config
    without `racing:` meant before `auto` became the default, 2026-12-07), resumed with a config that leaves racing
    at its default, stays unraced, as it was computed; any other config as given."""
    saved = RunDir(cfg.out).config
    if cfg.racing != "auto" or not saved.is_file():
        return cfg
    try:
        recorded = read_yaml(saved, ConfigError)  # the safe reader: aliases refused before they are expanded
    except ConfigError:
        return cfg  # `RunDir.open` says what is wrong with it
    if "racing" in recorded and recorded["racing"] is None:
        return cfg.model_copy(update={"racing": None})
    return cfg


class RunLock:
    """One writer per run folder: an exclusive `flock` on `.dfs-merge.lock`, held from the run's start to its
    end (`RunDir.close`); the kernel drops it when the process dies, however it dies. While held, the file
    names its holder (pid, host, start); it is emptied at the end, so a holder still named there is a run that
    was killed, and the next run takes the lock over, saying so (`previous`)."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_NAME
        self._fd: int | None = None
        self._marked = False
        self.previous = ""  # the holder a killed run left named in the file

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, create: bool = True) -> None:
        """Take the lock (creating its file unless `create` is false and it is missing: then nothing is taken);
        `ConfigError` naming the holder when another live run has it."""
        if self.held:
            return
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        try:
            fd = os.open(self.path, flags, 0o666)
        except FileNotFoundError:
            if not create:
                return
            raise ConfigError(f"out: {self.path.parent}: cannot create its lock file {LOCK_NAME}") from None
        except OSError as err:
            raise ConfigError(f"out: {self.path.parent}: cannot open its lock file {LOCK_NAME} "
                              f"({err.strerror or err})") from None
        holder = _read_holder(fd)
        if not _lock(fd, holder):
            os.close(fd)
            who = (f"process {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}" if holder
                   else "a process that is starting")
            raise ConfigError(f"out: {self.path.parent} is in use by another run ({who}); wait for it to end, "
                              "or choose another folder")
        self._fd = fd
        self.previous = (f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')})"
                         if holder else "")

    def mark(self) -> None:
        """Name this process in the lock file (once the run is known to go on)."""
        if self._fd is None:
            return
        text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": datetime.datetime.now().isoformat(timespec="seconds")})
        _rewrite(self._fd, text)
        self._marked = True

    def release(self) -> None:
        """Empty the lock file (where this run named itself in it) and let the lock go."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if self._marked:
                _rewrite(fd, "")
        except OSError:
            pass
        finally:
            os.close(fd)  # releases the flock


def _read_holder(fd: int) -> dict[str, Any]:
    """The holder a lock file names ({} when it names none, or nothing readable)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and "pid" in data else {}


def _lock(fd: int, holder: dict[str, Any]) -> bool:
    """Take the exclusive lock without waiting; False when another process holds it. Where the file system or
    the platform has no advisory locks, a holder named in the file that is alive on this host holds it."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError:  # no locks on this file system
            pass
    pid = holder.get("pid")
    return not (isinstance(pid, int) and holder.get("host") == socket.gethostname() and pid != os.getpid()
                and pid_alive(pid))


def _rewrite(fd: int, text: str) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, text.encode())
    os.fsync(fd)


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
        self.lock = RunLock(self.path)
        self.started = False  # whether something was evaluated here before (set by `open`)
        self.digest: str | None = None  # of the search config, carried by each evaluation line (set by `open`)
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
        """Check `cfg.out`: writable; not held by another live run; empty or a run's folder, and empty unless
        resuming; the same config when resuming. A folder where nothing was evaluated yet (a run that failed at
        its start) counts as empty. Writes nothing; an existing lock is taken (`close` lets it go)."""
        rd = cls(cfg.out)
        path = rd.path
        check_output(path, kind="folder", force=True, inputs=cfg.sources, error=ConfigError, what="out:")
        try:
            existing = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        except OSError as err:
            raise ConfigError(f"out: {path} cannot be listed ({err.strerror or err})") from None
        visible = [n for n in existing if not n.startswith(".")]
        if visible and not RUN_RECORDS & set(visible):
            raise ConfigError(f"out: {path} is not empty: it holds files that are not a run's ({_listing(visible)}); "
                              "choose an empty folder, or the folder of a run to resume it")
        try:
            rd.lock.acquire(create=False)  # a live run here is refused first, whatever else the folder holds
            # a run that stopped before its first evaluation computed nothing: it may start again, with any config
            started = bool(set(visible) - {"config.yaml", "sources.json", "report.html", "tracking"})
            if started and not resume:
                raise ConfigError(f"out: {path} is not empty ({_listing(visible)}); resume the run there "
                                  "(--resume) or choose another folder")
            try:
                path.mkdir(parents=True, exist_ok=True)
                with tempfile.NamedTemporaryFile(dir=path, prefix=".probe."):
                    pass
            except OSError as err:
                raise ConfigError(f"out: {path} is not writable ({err.strerror or err})") from None
            if resume and started and os.path.lexists(rd.config):
                rd._check_same_config(cfg, read_yaml(rd.config, ConfigError), f"the run in {path}")
        except BaseException:
            rd.lock.release()
            raise
        rd.started = started
        rd.digest = search_digest(cfg)
        return rd

    def start(self, cfg: RunConfig, fingerprints: list[str | None]) -> str | None:
        """Take the run's lock (`ConfigError` if another run took it meanwhile) and write sources.json and
        config.yaml, once the run is known to start or continue (so that a refused resume leaves the folder as
        it was). Returns a line when the lock of a killed run was taken over."""
        self.lock.acquire()
        self.lock.mark()
        write_atomic(self.sources, json.dumps([{"path": p, "fingerprint": f}
                                               for p, f in zip(cfg.sources, fingerprints, strict=True)], indent=1))
        write_atomic(self.config, yaml.dump(cfg.model_dump(mode="json"), Dumper=NoAliasDumper, sort_keys=False))
        if self.lock.previous:
            return f"out: {self.path}: took over the lock of {self.lock.previous}, which is no longer running"
        return None

    def check_resumable(self, cfg: RunConfig, state: dict[str, Any] | None, records: list[dict[str, Any]]) -> None:
        """Refuse a resume whose search config differs from the one the checkpoint recorded, or the one the
        logged evaluations were made with (config.yaml may have been edited along with the config)."""
        if state is not None and isinstance(state.get("search"), dict):
            self._check_same_config(cfg, state["search"], f"the checkpoint of {self.path}")
        digest = search_digest(cfg)
        for rec in records:
            if rec.get("search", digest) != digest:
                raise ConfigError(
                    f"resume: {self.evals} holds evaluations made under another search config (the evaluation of "
                    f"{str(rec.get('key'))[:40]}); only {_resumable()} may change (was config.yaml edited too?)")

    def _check_same_config(self, cfg: RunConfig, old: dict[str, Any], where: str) -> None:
        """Refuse to resume with a config that would change what is computed: a key outside `RESUMABLE_KEYS`
        whose value differs from `old`'s."""
        new = cfg.model_dump(mode="json")
        defaults = type(cfg).model_fields
        for key in new:
            if key in RESUMABLE_KEYS:
                continue
            # a key the run's config lacks was added to dfs-merge since: the run used its default
            was = old[key] if key in old else _json_default(defaults[key].get_default(call_default_factory=True))
            if was != new[key]:
                raise ConfigError(f"resume: {key} differs from {where} ({_short(was)} vs {_short(new[key])}); "
                                  f"only {_resumable()} may change")

    def check_sources(self, paths: list[str]) -> list[str | None]:
        """The sources' content fingerprints (those sources.json recorded, where it did); a resumed run whose
        sources' weights changed since is refused (it would mix two models), as is one whose sources.json is
        damaged (with the way out)."""
        from dfs_merge.models.metadata import check_same_sources

        recorded: list[str | None] = []
        if self.started and os.path.lexists(self.sources):  # a run that evaluated nothing recorded nothing to keep
            recorded = self._recorded_fingerprints(len(paths))
        try:
            now = check_same_sources(paths, recorded, paths, f"the run in {self.path}")
        except DfsMergeError as err:
            raise ConfigError(f"resume: {err}; start a new run in another folder, or put the old weights back") from None
        return [was or is_ for was, is_ in zip(recorded + [None] * len(paths), now, strict=False)]

    def _recorded_fingerprints(self, n: int) -> list[str | None]:
        """The fingerprints sources.json lists (one per source); a damaged file is a `ConfigError`."""
        way_out = ("put the run's sources.json back, or delete it to resume without checking that the sources' "
                   "weights are unchanged")
        try:
            data = read_json(self.sources, ConfigError, finite=True)
        except ConfigError as err:
            raise ConfigError(f"resume: {err}; {way_out}") from None
        if not (isinstance(data, list) and len(data) == n and all(
                isinstance(e, dict) and isinstance(e.get("fingerprint"), str | None) for e in data)):
            raise ConfigError(f"resume: {self.sources}: damaged (not a list of {n} sources with their fingerprints); "
                              f"{way_out}")
        return [e.get("fingerprint") for e in data]

    # ---- evaluations -------------------------------------------------------------------
    def read_evals(self) -> list[dict[str, Any]]:
        """Every complete evaluation line; a truncated last line (a killed write) is cut off the file."""
        return read_jsonl(self.evals, ConfigError)

    def append_eval(self, record: dict[str, Any]) -> None:
        """Append one evaluation as a JSON line (with the search config's digest), flushed and fsynced before
        returning."""
        self._append(self.evals, {**record, "search": self.digest} if self.digest else record)

    def read_docs(self) -> list[dict[str, Any]]:
        """Every complete line of the racing log (per-document results of each candidate's stages)."""
        return read_jsonl(self.docs, ConfigError)

    def append_docs(self, record: dict[str, Any]) -> None:
        """Append one stage's per-document results of one candidate, flushed and fsynced before returning."""
        self._append(self.docs, record)

    def _append(self, log: Path, record: dict[str, Any]) -> None:
        if log not in self._logs:
            self._logs[log] = open(log, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        append_jsonl(self._logs[log], record)

    def close(self) -> None:
        """Close the evaluation logs and let the run's lock go."""
        for f in self._logs.values():
            f.close()
        self._logs = {}
        self.lock.release()

    # ---- checkpoint --------------------------------------------------------------------
    def read_checkpoint(self) -> dict[str, Any] | None:
        """The last checkpoint, or None when the run has none yet."""
        if not os.path.lexists(self.checkpoint):
            return None
        state = read_json(self.checkpoint, ConfigError, finite=True)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(f"{self.checkpoint}: not a {CHECKPOINT_FORMAT} checkpoint")
        gen = state.get("generation")
        if isinstance(gen, bool) or not isinstance(gen, int) or not -1 <= gen <= 2**31:
            raise ConfigError(f"{self.checkpoint}: generation: {_short(gen)} is not a generation number; "
                              f"{RESTART_HINT.format(checkpoint=self.checkpoint)}")
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


def _listing(names: list[str]) -> str:
    """The first names of a folder's entries, for a message."""
    return ", ".join(_short(n, 40) for n in names[:3]) + (", ..." if len(names) > 3 else "")


def _short(value: Any, limit: int = 80) -> str:
    """A value for a one-line message: its repr, cut."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _resumable() -> str:
    return ", ".join(sorted(RESUMABLE_KEYS - {"out"}))


def _json_default(value: Any) -> Any:
    """A config field's default as `model_dump(mode="json")` writes it."""
    from pydantic import TypeAdapter

    return TypeAdapter(Any).dump_python(value, mode="json")
