"""lpu backend, profiles: the published TSP figures, GPU profiles built on flashc.profiles, and
validation of a user's profile file naming the bad field."""

from __future__ import annotations

import json

import pytest

from flashc.backends.lpu.hardware import LPU_V1, get_system, load_profile_file, profile_from_dict, with_changes
from flashc.errors import InputError, UnknownNameError
from flashc.profiles import PROFILES


def test_lpu_v1_has_the_published_tsp_figures_with_sources():
    p = get_system("lpu-v1")
    assert p.memory_bytes == 220 * 2**20
    assert p.clock_hz == 900e6
    assert p.matrix_ops["int8"] == pytest.approx(2 * 4 * 320 * 320 * 900e6)  # 737.28 TOPS
    assert p.matrix_ops["float16"] == pytest.approx(p.matrix_ops["int8"] / 4)
    assert (p.links_per_chip, p.link_bandwidth, p.hop_latency_s, p.chips_per_node) == (16, 14e9, 722e-9, 8)
    assert p.weight_bandwidth == pytest.approx(64 * 320 * 900e6)
    numeric = [k for k, v in LPU_V1.items() if isinstance(v, (int, float, dict)) and k != "sources"]
    missing = [k for k in numeric if k not in p.sources]
    assert not missing, f"fields without a source: {missing}"


@pytest.mark.parametrize("name", ["a100", "h100", "h200"])
def test_gpu_profiles_reuse_flashc_profiles(name):
    base, p = PROFILES[name], get_system(name)
    assert p.memory_bytes == base.memory_bytes
    # measured streaming rates sit below the datasheet, never above it
    assert 0.8 * base.memory_bandwidth < p.weight_bandwidth < base.memory_bandwidth
    assert 0.7 * base.peak_flops["bfloat16"] < p.matrix_ops["bfloat16"] < base.peak_flops["bfloat16"]
    assert p.vector_latency_s <= base.kernel_overhead_s
    assert not p.static_schedule


def test_profile_file_round_trip(tmp_path):
    path = tmp_path / "mine.json"
    data = {**get_system("lpu-v1").to_dict(), "name": "lpu-half", "memory_bytes": 110 * 2**20}
    path.write_text(json.dumps(data))
    p = load_profile_file(path)
    assert (p.name, p.memory_bytes, p.matrix_ops) == ("lpu-half", 110 * 2**20, get_system("lpu-v1").matrix_ops)
    assert get_system(str(path)) == p


@pytest.mark.parametrize("change, field", [
    ({"memory_bytes": "lots"}, "memory_bytes"),
    ({"link_bandwidth": -14e9}, "link_bandwidth"),
    ({"clock_hz": 0}, "clock_hz"),
    ({"chips_per_node": 2.5}, "chips_per_node"),
    ({"kind": "tpu"}, "kind"),
    ({"matrix_ops": {"int8": "fast"}}, "matrix_ops.int8"),
    ({"static_schedule": "yes"}, "static_schedule"),
    ({"links_per_peer": 3}, "links_per_peer"),  # 3 links to each of 7 peers exceed 16
    ({"memry_bytes": 1}, "memry_bytes"),
])
def test_invalid_profile_file_names_the_field(tmp_path, change, field):
    data = {**get_system("lpu-v1").to_dict(), **change}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=field.replace(".", r"\.")) as e:
        load_profile_file(path)
    assert str(path) in str(e.value)


def test_missing_field_and_bad_json_are_named(tmp_path):
    data = get_system("lpu-v1").to_dict()
    del data["hop_latency_s"]
    with pytest.raises(InputError, match="'hop_latency_s' is missing"):
        profile_from_dict(data)
    path = tmp_path / "broken.json"
    path.write_text('{"name": "x",')
    with pytest.raises(InputError, match="not valid JSON"):
        load_profile_file(path)
    with pytest.raises(UnknownNameError, match="lpu-v1"):
        get_system("lpu-v2")


def test_with_changes_validates_again():
    p = with_changes(get_system("lpu-v1"), memory_bytes=440 * 2**20)
    assert p.memory_bytes == 440 * 2**20 and p.link_bandwidth == 14e9
    with pytest.raises(InputError, match="link_bandwidth"):
        with_changes(p, link_bandwidth=0)
