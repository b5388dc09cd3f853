"""Property tests: the genome and config loaders, fed random bytes, random YAML trees and valid-looking files
with random numbers, return a value or raise a `DfsMergeError` (a one-line user error), never anything else."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from synthetic import write_fake_sources

from dfs_merge.config import ConstraintsConfig, RunConfig, load_config
from dfs_merge.errors import ConfigError, DfsMergeError, GenomeError
from dfs_merge.genome import Genome, Route
from dfs_merge.genome_files import genome_from_dict, genome_to_dict, load_genome
from dfs_merge.search.state import RunRandom

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- strategies -------------------------------------------------------------------------------------------

HUGE_INTS = st.one_of(st.integers(), st.sampled_from([0, -1, 10**18, -(10**18), 10**400, 2**63, 2**64 + 1]))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf, -math.inf,
                                                                                     0.0, -0.0, 1e308, 5e-324]))
SCALARS = st.one_of(st.none(), st.booleans(), HUGE_INTS, FLOATS, st.text(max_size=20))
KEYS = st.one_of(st.text(max_size=12), st.sampled_from(["format", "sources", "bits", "scales", "route", "tasks",
                                                        "population", "limit", "ünïcödé", "🦙", "\u202e", "\n"]),
                 st.none(), st.booleans(), st.integers(), st.floats())  # YAML keys need not be strings


def trees(leaves: st.SearchStrategy = SCALARS) -> st.SearchStrategy:
    """Nested dicts / lists over `leaves`."""
    return st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(KEYS, inner, max_size=4)), max_leaves=20)


def anything() -> st.SearchStrategy:
    """A value that may sit where a number, string, list or mapping is expected."""
    return st.one_of(SCALARS, trees())


def maybe(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """Usually `strategy`, sometimes anything at all."""
    return st.one_of(strategy, strategy, strategy, anything())


_TMP = tempfile.TemporaryDirectory(prefix="dfs-hostile-")  # removed when the test process ends


def write(data: bytes | str) -> Path:
    """A temporary file holding `data` (one file reused by every example: no function-scoped fixture under
    hypothesis)."""
    path = Path(_TMP.name) / "input.yaml"
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8", errors="surrogatepass")
    return path


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # a value drawn twice is written twice, not as an alias
        return True


def dump(tree: Any) -> str:
    return yaml.dump(tree, Dumper=_NoAliases, allow_unicode=True, sort_keys=False)


def loads_or_refuses(load, arg, error: type[DfsMergeError]) -> Any:
    """`load(arg)`, or None when it raised `error`; anything else raised fails the test."""
    try:
        return load(arg)
    except error as err:
        text = str(err)
        assert text and "\n" not in text.strip(), repr(text)  # one line
        return None


# ---- the genome loader ------------------------------------------------------------------------------------

SOURCE = "models/source-a"


def base_genome_dict() -> dict[str, Any]:
    g = Genome.from_route(Route.parse("0:0-3"), [SOURCE], [4], 1, "slot", ConstraintsConfig())
    return genome_to_dict(g)


def check_genome(g: Genome | None) -> None:
    """What a loaded genome promises: it decodes, meets its constraints, and round-trips through its mapping."""
    if g is None:
        return
    route = g.check()
    assert len(route) >= 1
    again = genome_from_dict(genome_to_dict(g))
    assert again.decode().text() == route.text()


def test_the_base_genome_loads():
    g = genome_from_dict(base_genome_dict())
    assert g.decode().text() == "0:0-3"


@pytest.mark.slow  # fuzzing (Hypothesis, many examples)
@SETTINGS
@given(st.binary(max_size=400))
@example(b"\xff\xfe\x00\x01")
@example(b"format: dfs-merge/genome@1\nsources: \xe9\n")
@example(b"[" * 5000)
@example(b"{a: " * 3000)
@example(b"- " * 3000 + b"x")
@example(b"format: !!python/object:os.system {}\n")
@example(b"? [a, b]\n: 1\n")
def test_genome_file_of_random_bytes(data):
    check_genome(loads_or_refuses(load_genome, write(data), GenomeError))


@pytest.mark.slow  # fuzzing (Hypothesis, many examples)
@SETTINGS
@given(trees())
def test_genome_file_of_a_random_yaml_tree(tree):
    check_genome(loads_or_refuses(load_genome, write(dump(tree)), GenomeError))


@pytest.mark.slow  # fuzzing (Hypothesis, many examples)
@SETTINGS
@given(st.dictionaries(KEYS, anything(), max_size=6))
def test_genome_mapping_with_random_keys(extra):
    data = base_genome_dict()
    data.update(extra)
    check_genome(loads_or_refuses(genome_from_dict, data, GenomeError))


def route_texts() -> st.SearchStrategy:
    part = st.builds(lambda s, a, b: f"{s}:{a}" if b is None else f"{s}:{a}-{b}",
                     st.one_of(st.integers(0, 3), HUGE_INTS.map(abs)), st.one_of(st.integers(0, 5), HUGE_INTS.map(abs)),
                     st.one_of(st.none(), st.integers(0, 5), HUGE_INTS.map(abs)))
    return st.one_of(st.lists(part, min_size=0, max_size=4).map(", ".join), st.text(max_size=30),
                     st.sampled_from(["0:0-999999999999", "0:" + "9" * 5000, "0:٣", "0:0-3, 0:3-0", "0:0--3"]))


@st.composite
def genome_dicts(draw) -> dict[str, Any]:
    """A genome mapping that looks valid, with random numbers in its counts, bits, scales and constraints."""
    n_sources = draw(st.integers(1, 3))
    layers = [draw(maybe(st.one_of(st.integers(1, 6), HUGE_INTS))) for _ in range(n_sources)]
    data: dict[str, Any] = {
        "format": "dfs-merge/genome@1",
        "sources": [{"path": f"src{i}", "layers": n} for i, n in enumerate(layers)],
        "repeats": draw(maybe(st.one_of(st.integers(1, 3), HUGE_INTS))),
        "scaling": draw(maybe(st.sampled_from(["slot", "transition", "none"]))),
        "constraints": {"pin_ends": draw(maybe(st.booleans())),
                        "min_hops": draw(maybe(st.one_of(st.integers(1, 8), HUGE_INTS))),
                        "max_hops": draw(maybe(st.one_of(st.none(), st.integers(1, 30), HUGE_INTS)))},
    }
    if draw(st.booleans()):
        data["bits"] = draw(maybe(st.one_of(
            st.lists(st.text(alphabet="01", min_size=0, max_size=8), max_size=4),
            st.text(alphabet="01 \n", max_size=24), st.text(max_size=10))))
        data["scales"] = draw(maybe(st.one_of(st.lists(st.lists(maybe(FLOATS), max_size=8), max_size=4),
                                              st.lists(maybe(FLOATS), max_size=20))))
        if draw(st.booleans()):
            data["route"] = draw(route_texts())
    else:
        data["route"] = draw(route_texts())
        data["hop_scales"] = draw(maybe(st.one_of(st.none(), st.lists(st.one_of(FLOATS, HUGE_INTS), max_size=8))))
    for key in ("hops", "scores"):
        if draw(st.booleans()):
            data[key] = draw(anything())
    return data


@pytest.mark.slow  # fuzzing (Hypothesis, many examples)
@SETTINGS
@given(genome_dicts())
@example({"format": "dfs-merge/genome@1", "sources": [{"path": "a", "layers": 10**12}], "route": "0:0"})
@example({"format": "dfs-merge/genome@1", "sources": [{"path": "a", "layers": 10**400}], "route": "0:0"})
@example({"format": "dfs-merge/genome@1", "sources": [{"path": "a", "layers": 4}], "repeats": 10**12,
          "route": "0:0-3"})
@example({"format": "dfs-merge/genome@1", "sources": [{"path": "a", "layers": 4}], "route": "0:0-3",
          "hop_scales": [10**400, 1, 1, 1]})
@example({"format": "dfs-merge/genome@1", "sources": [{"path": "a", "layers": 4}], "route": "0:0-999999999999"})
@example({"format": "dfs-merge/genome@1", "sources": [{"path": "a", "layers": 4}], "route": "0:" + "9" * 5000})
@example({"format": "dfs-merge/genome@1", "sources": [{"path": "a", "layers": 4}], "bits": "1111",
          "route": "0:0-999999999999"})
@example({"format": "dfs-merge/genome@1", "sources": [{"path": "a", "layers": 4}], "bits": "1111",
          "scales": [[1, 1, 1, 10**400]]})
@example({"format": "dfs-merge/genome@1", "sources": [{"path": "a", "layers": 4}], "bits": "1111",
          "constraints": {"min_hops": 10**400}})
def test_valid_looking_genome_with_random_numbers(data):
    check_genome(loads_or_refuses(genome_from_dict, data, GenomeError))


@pytest.mark.slow  # fuzzing (Hypothesis, many examples)
@SETTINGS
@given(genome_dicts())
def test_valid_looking_genome_file_with_random_numbers(data):
    check_genome(loads_or_refuses(load_genome, write(dump(data)), GenomeError))


@st.composite
def near_valid_genome_dicts(draw) -> dict[str, Any]:
    """One source of 4 layers, all included, with random numbers as its scales (slot or transition scaling,
    given as bits + scales or as route + hop_scales): mostly loadable, so that what loads can be checked."""
    numbers = st.one_of(st.floats(0.01, 10), FLOATS, st.integers(-3, 3), st.sampled_from([0, -0.0, 10**400]))
    scaling = draw(st.sampled_from(["slot", "transition"]))
    data: dict[str, Any] = {"format": "dfs-merge/genome@1", "sources": [{"path": SOURCE, "layers": 4}],
                            "scaling": scaling, "constraints": {"pin_ends": draw(st.booleans())}}
    if draw(st.booleans()):
        data["bits"] = "1111"
        n = 4 if scaling == "slot" else 16
        data["scales"] = draw(st.lists(numbers, min_size=n, max_size=n))
    else:
        data["route"] = "0:0-3"
        data["hop_scales"] = draw(st.lists(numbers, min_size=4, max_size=4))
    return data


@pytest.mark.slow  # fuzzing (Hypothesis, many examples)
@SETTINGS
@given(near_valid_genome_dicts())
def test_near_valid_genome_with_random_scales(data):
    check_genome(loads_or_refuses(genome_from_dict, data, GenomeError))


@pytest.mark.slow  # fuzzing (Hypothesis, many examples)
@SETTINGS
@given(st.one_of(near_valid_genome_dicts(), genome_dicts()))
@example({"format": "dfs-merge/genome@1", "sources": [{"path": "a", "layers": 4}], "route": "0:0-3",
          "hop_scales": [1, math.nan, 1, 1]})
@example({"format": "dfs-merge/genome@1", "sources": [{"path": "a", "layers": 4}], "bits": "1111",
          "scales": [[1, -2.0, math.inf, 0.0]]})
def test_loaded_scales_are_finite_and_positive(data):
    g = loads_or_refuses(genome_from_dict, data, GenomeError)
    if g is None:
        return
    assert all(math.isfinite(x) and x > 0 for x in g.scales), g.scales
    assert all(math.isfinite(x) and x > 0 for x in g.decode().scales)


# ---- the config loader ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fake_sources(tmp_path_factory) -> list[str]:
    return write_fake_sources(tmp_path_factory.mktemp("hostile_sources"))


def base_config(sources: list[str]) -> dict[str, Any]:
    return {"sources": list(sources), "repeats": 2, "tasks": {"tiny_mc": 1.0}, "population": 8, "generations": 2}


def check_config(cfg: RunConfig | None) -> None:
    """What a loaded config promises: sources and tasks present, a population the elite fits in, a sane range."""
    if cfg is None:
        return
    assert cfg.sources and all(isinstance(s, str) for s in cfg.sources)
    assert cfg.tasks and cfg.population >= 2 and cfg.elite < cfg.population
    lo, hi = cfg.scale_range
    assert 0 < lo <= hi and math.isfinite(hi)
    assert isinstance(cfg.trust_remote_code, bool)
    RunRandom(cfg.seed)  # the run's random state can be built from its seed


def test_the_base_config_loads(fake_sources):
    cfg = load_config(write(dump(base_config(fake_sources))))
    assert cfg.sources == fake_sources and cfg.trust_remote_code is False


@pytest.mark.parametrize("value", ["yes", "true", "1", 1, "on", 0, "no"])
def test_trust_remote_code_must_be_a_real_boolean(fake_sources, value):
    data = base_config(fake_sources) | {"trust_remote_code": value}
    with pytest.raises(ConfigError, match="trust_remote_code"):
        load_config(write(dump(data)))


def test_trust_remote_code_true_is_accepted(fake_sources):
    data = base_config(fake_sources) | {"trust_remote_code": True}
    assert load_config(write(dump(data))).trust_remote_code is True


@pytest.mark.slow  # fuzzing (Hypothesis, many examples)
@SETTINGS
@given(st.binary(max_size=400))
@example(b"\xff\xfe\x00\x01")
@example(b"sources: [\xe9]\n")
@example(b"[" * 5000)
@example(b"{a: " * 3000)
@example(b"tasks: !!python/name:os.system\n")
def test_config_file_of_random_bytes(data):
    check_config(loads_or_refuses(load_config, write(data), ConfigError))


@pytest.mark.slow  # fuzzing (Hypothesis, many examples)
@SETTINGS
@given(trees())
def test_config_file_of_a_random_yaml_tree(tree):
    check_config(loads_or_refuses(load_config, write(dump(tree)), ConfigError))


@st.composite
def config_dicts(draw, sources: list[str]) -> dict[str, Any]:
    """A config that looks valid, with random population, limit, scale_range, trust_remote_code, sources..."""
    data = base_config(sources)
    source_lists = st.one_of(st.just(sources), st.lists(st.one_of(st.sampled_from(sources), st.text(max_size=300)),
                                                        max_size=3),
                             st.sampled_from([["a\x00b"], ["x" * 5000], ["/" + "y" * 300 + "/z"], [""], ["~"]]))
    fields = {
        "sources": maybe(source_lists),
        "population": maybe(st.one_of(st.integers(-2, 40), HUGE_INTS)),
        "elite": maybe(st.integers(-1, 10)),
        "limit": maybe(st.one_of(st.none(), HUGE_INTS, st.dictionaries(st.sampled_from(["tiny_mc", "other"]),
                                                                       HUGE_INTS, max_size=2))),
        "scale_range": maybe(st.lists(st.one_of(FLOATS, HUGE_INTS), min_size=0, max_size=3)),
        "trust_remote_code": maybe(st.one_of(st.booleans(), st.sampled_from(["yes", "no", "true", 1, 0, None]))),
        "tasks": maybe(st.dictionaries(st.text(max_size=10), st.one_of(FLOATS, HUGE_INTS), max_size=3)),
        "repeats": maybe(HUGE_INTS),
        "seed": maybe(st.one_of(HUGE_INTS, st.sampled_from([-1, 2**32, 2**32 - 1]))),
        "max_length": maybe(HUGE_INTS),
        "constraints": maybe(st.fixed_dictionaries({"min_hops": HUGE_INTS, "max_hops": HUGE_INTS})),
        "eval_suites": maybe(source_lists),
    }
    for key, strategy in fields.items():
        if draw(st.booleans()):
            data[key] = draw(strategy)
    return data


@pytest.mark.slow  # fuzzing (Hypothesis, many examples)
@settings(SETTINGS, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_valid_looking_config_with_random_numbers(fake_sources, data):
    cfg_data = data.draw(config_dicts(fake_sources))
    check_config(loads_or_refuses(load_config, write(dump(cfg_data)), ConfigError))


@pytest.mark.parametrize("override", [{"sources": ["a\x00b"]}, {"sources": ["x" * 5000]},
                                      {"eval_suites": ["/" + "y" * 300 + "/z"]},
                                      {"scale_range": [0.5, math.inf]}, {"scale_range": [math.nan, 1.0]},
                                      {"population": 10**400}, {"limit": 10**400}])
def test_hostile_config_fields(fake_sources, override):
    data = base_config(fake_sources) | override
    check_config(loads_or_refuses(load_config, write(dump(data)), ConfigError))


@pytest.mark.parametrize("name", ["a\x00b.yaml", "x" * 300 + ".yaml"])
def test_hostile_config_path(name):
    with pytest.raises(ConfigError):
        load_config(Path(tempfile.gettempdir()) / name)
    with pytest.raises(GenomeError):
        load_genome(Path(tempfile.gettempdir()) / name)


def test_a_directory_is_not_a_config(tmp_path):
    with pytest.raises(ConfigError):
        load_config(tmp_path)


@pytest.mark.parametrize("name", ["two\nlines.yaml", "tab\there.yaml", "bell\a.yaml"])
def test_an_unprintable_file_name_still_gives_one_line(tmp_path, name):
    path = tmp_path / name
    path.write_text(dump({"format": "dfs-merge/genome@1", "sources": []}))
    with pytest.raises(GenomeError) as err:
        load_genome(path)
    assert "\n" not in str(err.value) and "sources" in str(err.value)
    path.write_text(dump({"sources": []}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "\n" not in str(err.value) and "sources" in str(err.value)
