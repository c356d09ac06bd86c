"""The semantic index of cached responses: groups, eviction order, persistence, bad files."""

from __future__ import annotations

import pytest
import torch

from promptcache.errors import StoreError
from promptcache.response_index import FILE_NAME, SemanticIndex

E = "test/embedder"
KEYS = [f"{i:02x}" * 16 for i in range(1, 7)]


def unit(*xs: float) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(xs, dtype=torch.float32), dim=0)


def test_nearest_stays_in_its_group_and_above_the_threshold(tmp_path):
    index = SemanticIndex(tmp_path, E)
    index.add("g1", KEYS[0], unit(1, 0, 0))
    index.add("g1", KEYS[1], unit(1, 1, 0))
    index.add("g2", KEYS[2], unit(1, 0, 0))
    found = index.nearest("g1", unit(1, 0.1, 0), threshold=0.5)
    assert [n.key for n in found] == [KEYS[0], KEYS[1]]
    assert found[0].similarity == pytest.approx(float(unit(1, 0, 0) @ unit(1, 0.1, 0)))
    assert [n.key for n in index.nearest("g1", unit(1, 0.1, 0), threshold=0.9)] == [KEYS[0]]
    assert index.nearest("g3", unit(1, 0, 0), threshold=0.0) == []


def test_eviction_order_least_recently_used_first(tmp_path):
    index = SemanticIndex(tmp_path, E, max_entries=3)
    for k, v in zip(KEYS[:3], [unit(1, 0, 0), unit(0, 1, 0), unit(0, 0, 1)]):
        index.add("g", k, v)
    assert index.keys() == KEYS[:3]
    index.nearest("g", unit(1, 0, 0), threshold=0.9)  # KEYS[0] used: now the most recent
    assert index.keys() == [KEYS[1], KEYS[2], KEYS[0]]
    index.add("g", KEYS[3], unit(1, 1, 0))  # full: KEYS[1] goes
    assert index.keys() == [KEYS[2], KEYS[0], KEYS[3]]
    index.add("g", KEYS[4], unit(0, 1, 1))  # then KEYS[2]
    assert index.keys() == [KEYS[0], KEYS[3], KEYS[4]]
    assert len(index) == 3


def test_persists_and_reloads_with_a_smaller_bound(tmp_path):
    index = SemanticIndex(tmp_path, E)
    for i, k in enumerate(KEYS[:4]):
        index.add("g", k, unit(1, i, 0))
    again = SemanticIndex(tmp_path, E)
    assert again.keys() == KEYS[:4]
    assert [n.key for n in again.nearest("g", unit(1, 3, 0), threshold=0.999)] == [KEYS[3]]
    small = SemanticIndex(tmp_path, E, max_entries=2)
    assert small.keys() == [KEYS[2], KEYS[3]]


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "other-embedder"])
def test_a_bad_file_is_an_empty_index(tmp_path, damage):
    SemanticIndex(tmp_path, E).add("g", KEYS[0], unit(1, 0, 0))
    path = tmp_path / FILE_NAME
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x40  # a vector byte: the checksum no longer matches
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "garbage":
        path.write_bytes(b"\xff" * 64)
    index = SemanticIndex(tmp_path, "another/embedder" if damage == "other-embedder" else E)
    assert len(index) == 0
    index.add("g", KEYS[1], unit(0, 1, 0))  # and it works on
    assert SemanticIndex(tmp_path, index.identity).keys() == [KEYS[1]]


def test_remove_and_bad_bound(tmp_path):
    index = SemanticIndex(tmp_path, E)
    index.add("g", KEYS[0], unit(1, 0, 0))
    index.remove(KEYS[0])
    assert len(SemanticIndex(tmp_path, E)) == 0
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(StoreError, match="max_entries"):
            SemanticIndex(tmp_path, E, max_entries=bad)
