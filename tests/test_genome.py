"""The genome: decoding, constraints, canonical key, the YAML file format and its errors."""

from __future__ import annotations

import pytest
import yaml

from dfs_merge.config import ConstraintsConfig
from dfs_merge.errors import GenomeError
from dfs_merge.genome import Genome, Hop, Route, seed_genomes
from dfs_merge.genome_files import genome_from_dict, genome_to_dict, load_genome, save_genome

SOURCES = ("a", "b")


def two_source_genome(scaling: str = "slot", pin: bool = True, repeats: int = 2) -> Genome:
    return Genome.empty(SOURCES, (4, 4), repeats, scaling, ConstraintsConfig(pin_ends=pin))


def test_layout_and_identity_seed():
    g = two_source_genome()
    assert g.layout.T == 16 and g.layout.M == 8
    seeds = seed_genomes(g)
    assert [s.decode().text() for s in seeds] == ["0:0-3", "0:0, 1:0-3, 0:3"]
    assert all(h.scale == 1.0 for h in seeds[0].decode())


def test_seed_skips_sources_of_other_depth():
    g = Genome.empty(SOURCES, (4, 3), 1)
    assert [s.decode().text() for s in seed_genomes(g)] == ["0:0-3"]


def test_slot_order_and_pinning():
    g = two_source_genome()
    bits = [0] * 16
    bits[5] = bits[6] = 1  # source 1, layers 1-2 in repetition 0
    bits[8 + 1] = 1  # source 0 layer 1 in repetition 1
    route = g.with_bits(bits).decode()
    assert route.text() == "0:0, 1:1-2, 0:1, 0:3"
    unpinned = Genome.empty(SOURCES, (4, 4), 2, constraints=ConstraintsConfig(pin_ends=False)).with_bits(bits)
    assert unpinned.decode().text() == "1:1-2, 0:1"


def test_slot_scales_follow_hops():
    g = two_source_genome()
    bits = [1, 1, 1, 1] + [0] * 12
    scales = [1.0, 0.5, 2.0, 1.0] + [1.0] * 12
    assert g.with_bits(bits, scales).decode().scales == [1.0, 0.5, 2.0, 1.0]


def test_transition_scales_index_previous_and_this_layer():
    g = two_source_genome("transition", pin=False, repeats=1)
    m = g.layout.M
    scales = [1.0] * (m * m)
    scales[0 * m + 5] = 0.7  # base layer 0 -> source 1 layer 1
    bits = [1, 0, 0, 0, 0, 1, 0, 0]
    route = g.with_bits(bits, scales).decode()
    assert [(h.source, h.layer, h.scale) for h in route] == [(0, 0, 1.0), (1, 1, 0.7)]


def test_none_scaling_has_no_scales():
    g = two_source_genome("none")
    assert g.scales == ()
    assert all(h.scale == 1.0 for h in seed_genomes(g)[0].decode())


def test_canonical_key_equates_equivalent_genomes():
    # The same route from different slots (repetition 0 vs 1), and from different scaling kinds.
    g = two_source_genome(pin=False)
    a = g.with_bits([0, 1, 1, 0] + [0] * 12)
    b = g.with_bits([0] * 8 + [0, 1, 1, 0] + [0] * 4)
    c = Genome.empty(SOURCES, (4, 4), 2, "none", ConstraintsConfig(pin_ends=False)).with_bits(a.bits)
    assert a.bits != b.bits
    assert a.key() == b.key() == c.key()
    scaled = g.with_bits(a.bits, [1.0, 1.0, 0.9] + [1.0] * 13)
    assert scaled.key() != a.key()


def test_from_route_round_trip_with_repeats():
    route = Route.parse("0:0-3, 0:1-3", [1, 1, 1, 1, 0.8, 1.2, 1])
    g = Genome.from_route(route, SOURCES, (4, 4), 2)
    assert g.decode() == route
    with pytest.raises(GenomeError, match="cannot follow"):
        Genome.from_route(Route.parse("0:0-3, 0:0-3, 0:0-3"), SOURCES, (4, 4), 2)


@pytest.mark.parametrize("text, scales, repeats", [
    ("0:1-2", None, 1),  # neither end pinned
    ("0:0-2, 0:1-3", None, 2),  # naive deepening of 4 layers
    ("0:3, 0:3, 1:0, 0:0", [0.5, 2.0, 1.0, 1.25], 3),  # a layer twice, a scaled first hop
])
def test_exact_genome_checks_to_the_route_whatever_the_constraints(text, scales, repeats):
    route = Route.parse(text, scales)
    g = Genome.exact(route, SOURCES, (4, 4))
    assert g.layout.repeats == repeats and g.check() == route and g.key() == route.key()
    assert genome_from_dict(genome_to_dict(g)).check() == route  # as a worker gets it


def test_file_round_trip(tmp_path):
    route = Route.parse("0:0-3, 1:1-2, 0:2-3", [1, 1, 1, 1, 0.75, 1.25, 1, 1])
    g = Genome.from_route(route, SOURCES, (4, 4), 2)
    g = Genome(g.sources, g.layout, g.bits, g.scaling, g.scales, g.constraints, {"dev": {"score": 0.5}})
    path = tmp_path / "g.genome.yaml"
    save_genome(g, path)
    text = path.read_text()
    assert "route: 0:0-3, 1:1-2, 0:2-3" in text
    back = load_genome(path)
    assert back == g and back.key() == g.key() and back.scores == g.scores


def test_file_with_route_only(tmp_path):
    path = tmp_path / "hand.yaml"
    path.write_text(
        "format: dfs-merge/genome@1\n"
        "sources: [{path: m, layers: 30}]\n"
        "repeats: 2\n"
        "route: 0:0-19, 0:10-29\n"
    )
    g = load_genome(path)
    assert len(g.decode()) == 40 and g.decode().text() == "0:0-19, 0:10-29"


def write(tmp_path, data) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def valid_dict() -> dict:
    return genome_to_dict(seed_genomes(two_source_genome())[0])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(bits=d["bits"][:-1]), r"bits: expected 16 \(8 layers x 2 repeats\), got 12"),
        (lambda d: d.update(bits=["0" * 8, "0" * 8], constraints={"pin_ends": False}), "zero hops"),
        (lambda d: d.update(colour="red"), "colour: unknown key"),
        (lambda d: d.update(repeats="two"), "repeats: Input should be a valid integer"),
        (lambda d: d.update(scales=[[1.0]]), "scales: scaling 'slot' needs 16 values, got 1"),
        (lambda d: d.update(route="0:0-2"), "route: '0:0-2' does not match the bits"),
        (lambda d: d.update(constraints={"pin_ends": True, "max_hops": 2}), "above max_hops 2"),
        (lambda d: d.pop("format"), "not a dfs-merge genome"),
    ],
)
def test_bad_genome_files_name_the_problem(tmp_path, mutate, message):
    d = valid_dict()
    mutate(d)
    with pytest.raises(GenomeError, match=message):
        load_genome(write(tmp_path, d))


def test_not_a_genome_yaml(tmp_path):
    with pytest.raises(GenomeError, match="expected a YAML mapping"):
        load_genome(write(tmp_path, "- just\n- a list\n"))
    with pytest.raises(GenomeError, match="not valid YAML"):
        load_genome(write(tmp_path, "a: [unclosed\n"))
    with pytest.raises(GenomeError, match="no such file"):
        load_genome(tmp_path / "missing.yaml")


def test_route_parse_errors():
    with pytest.raises(GenomeError, match="cannot read 'x:1'"):
        Route.parse("0:0-3, x:1")
    assert Route.parse("1:3-1").hops == (Hop(1, 3), Hop(1, 2), Hop(1, 1))
