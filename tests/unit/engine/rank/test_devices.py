"""The CUDA index each tensor-parallel rank picks, from fake environments (no CUDA needed)."""

from __future__ import annotations

import pytest

from cluster.errors import ConfigError
from engine.rank.devices import choose_device, parse_visible_devices


def test_inside_ray_each_rank_sees_only_its_gpu_and_uses_index_0():
    # Ray gives rank 3 physical GPU 5 and sets CUDA_VISIBLE_DEVICES=5: CUDA calls it cuda:0,
    # so LOCAL_RANK must be 0, not the rank (the bug: cuda:3 -> "invalid device ordinal").
    choice = choose_device("cuda", 3, ray_gpu_ids=[5], cuda_visible_devices="5", device_count=1)
    assert (choice.index, choice.local_rank, choice.gpu_id) == (0, 0, "5")
    assert choice.torch_device == "cuda:0"


def test_ray_ids_are_found_by_position_in_the_visible_list():
    choice = choose_device("cuda", 1, ray_gpu_ids=["6"], cuda_visible_devices="2,6", device_count=2)
    assert choice.index == 1 and choice.gpu_id == "6"


def test_ray_gpu_uuids_are_matched_as_strings():
    visible = "GPU-aaaa,GPU-bbbb"
    choice = choose_device("cuda", 0, ray_gpu_ids=["GPU-bbbb"], cuda_visible_devices=visible)
    assert choice.index == 1


def test_ray_without_isolation_uses_the_physical_id():
    # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: every GPU visible, the id is the index
    choice = choose_device("cuda", 2, ray_gpu_ids=[7], cuda_visible_devices=None, device_count=8)
    assert choice.index == 7 and choice.local_rank == 7


def test_a_ray_gpu_missing_from_the_visible_list_is_refused_with_both_values():
    with pytest.raises(ConfigError) as err:
        choose_device("cuda", 0, ray_gpu_ids=[3], cuda_visible_devices="0,1")
    assert "GPU 3" in err.value.message and "'0,1'" in err.value.message


def test_outside_ray_rank_r_takes_the_r_th_visible_gpu():
    for rank in range(4):
        choice = choose_device("cuda", rank, cuda_visible_devices="4,5,6,7", device_count=4)
        assert choice.index == rank and choice.local_rank == rank
        assert choice.gpu_id == str(4 + rank)
    assert choose_device("cuda", 1, device_count=2).index == 1  # variable unset


def test_more_ranks_than_gpus_is_refused_naming_tp_size():
    with pytest.raises(ConfigError) as err:
        choose_device("cuda", 2, cuda_visible_devices="0,1", device_count=2)
    assert err.value.param == "tp_size" and "sees 2" in err.value.message
    with pytest.raises(ConfigError):
        choose_device("cuda", 0, cuda_visible_devices="", device_count=0)


def test_an_index_beyond_cudas_device_count_is_refused():
    with pytest.raises(ConfigError) as err:
        choose_device("cuda", 0, ray_gpu_ids=[5], cuda_visible_devices=None, device_count=2)
    assert "cuda:5" in err.value.message


def test_cpu_ranks_keep_their_rank_as_local_rank_and_no_cuda_index():
    choice = choose_device("cpu", 3, ray_gpu_ids=[], cuda_visible_devices="0")
    assert (choice.kind, choice.index, choice.local_rank) == ("cpu", None, 3)
    assert choice.torch_device == "cpu"


def test_visible_devices_parsing():
    assert parse_visible_devices(None) is None
    assert parse_visible_devices("") == []
    assert parse_visible_devices(" 0, 3 ,") == ["0", "3"]
