"""Tests of rapid_vmm.flavors: the vm_types grid and request rounding."""

import os
import subprocess
import sys

import pytest

from rapid_vmm import exception
from rapid_vmm import flavors
from rapid_vmm.conf import default as default_opts

DEFAULT = default_opts.DEFAULT_VM_TYPES


@pytest.fixture
def grid():
    return flavors.parse_grid(DEFAULT)


# -- parse_grid -----------------------------------------------------------


def test_default_grid(grid):
    assert grid.vcpus == (1, 2, 4)
    assert grid.memory_mb == (1024, 2048, 4096)
    assert grid.disk_gb == (20, 40)


@pytest.mark.parametrize('text', [
    '1,2,4x1024,2048,4096x20,40',
    '  1, 2 ,4  x 1024 , 2048,4096 x  20 ,40  ',
    '1,2,4 X 1024,2048,4096 X 20,40',
    '\t1,2,4\tx\n1024,2048,4096 x 20,40\n',
])
def test_parse_grid_whitespace_and_case(text):
    grid = flavors.parse_grid(text)
    assert (grid.vcpus, grid.memory_mb, grid.disk_gb) == (
        (1, 2, 4), (1024, 2048, 4096), (20, 40))


def test_parse_grid_single_values():
    grid = flavors.parse_grid('2 x 512 x 0')
    assert grid.types == [flavors.VmType(2, 512, 0)]
    assert grid.smallest == grid.largest == flavors.VmType(2, 512, 0)


def test_parse_grid_disk_zero_allowed():
    assert flavors.parse_grid('1 x 1024 x 0,20').disk_gb == (0, 20)


@pytest.mark.parametrize('text', [
    '1,2,4 x 1024,2048,4096',                 # two lists
    '1,2,4',                                  # one list
    '1 x 2 x 3 x 4',                          # four lists
    '',                                       # nothing
    '1,2,a x 1024 x 20',                      # not an integer
    '1,2 x 1024.5 x 20',                      # float
    '1,2 x 1024 x 20,',                       # trailing comma: empty item
    '1,,2 x 1024 x 20',                       # empty item
    '1 x  x 20',                              # empty list
    '0,1 x 1024 x 20',                        # zero vCPUs
    '1 x 0 x 20',                             # zero memory
    '-1 x 1024 x 20',                         # negative vCPUs
    '1 x 1024 x -20',                         # negative disk
    '2,1 x 1024 x 20',                        # unsorted vCPUs
    '1 x 2048,1024 x 20',                     # unsorted memory
    '1 x 1024 x 40,20',                       # unsorted disk
    '1,1 x 1024 x 20',                        # duplicate vCPUs
    '1 x 1024,1024 x 20',                     # duplicate memory
    '1 x 1024 x 20,20',                       # duplicate disk
])
def test_parse_grid_refuses(text):
    with pytest.raises(exception.ConfigError) as info:
        flavors.parse_grid(text)
    message = str(info.value)
    assert message.startswith('Bad configuration: vm_types')
    assert '\n' not in message


@pytest.mark.parametrize('text, words', [
    ('1,2 x 1024', 'three lists'),
    ('1,a x 1024 x 20', 'vCPU list'),
    ('1 x 1024,b x 20', 'memory list'),
    ('0 x 1024 x 20', 'vCPU values must be >= 1'),
    ('1 x 1024 x -1', 'disk values must be >= 0'),
    ('1 x 2048,1024 x 20', 'memory list must be strictly ascending'),
])
def test_parse_grid_message_names_the_problem(text, words):
    with pytest.raises(exception.ConfigError, match=words):
        flavors.parse_grid(text)


# -- types, smallest, largest, index --------------------------------------


def test_types_of_default_grid(grid):
    types = grid.types
    assert len(types) == 18
    assert len(set(types)) == 18
    assert types[0] == flavors.VmType(1, 1024, 20)
    assert types[1] == flavors.VmType(1, 1024, 40)
    assert types[2] == flavors.VmType(1, 2048, 20)
    assert types[6] == flavors.VmType(2, 1024, 20)
    assert types[-1] == flavors.VmType(4, 4096, 40)


def test_smallest_and_largest(grid):
    assert grid.smallest == flavors.VmType(1, 1024, 20)
    assert grid.largest == flavors.VmType(4, 4096, 40)


def test_index_numbering_vcpu_major_then_memory_then_disk(grid):
    assert grid.index(flavors.VmType(1, 1024, 20)) == 0
    assert grid.index(flavors.VmType(1, 1024, 40)) == 1
    assert grid.index(flavors.VmType(1, 2048, 20)) == 2
    assert grid.index(flavors.VmType(1, 4096, 40)) == 5
    assert grid.index(flavors.VmType(2, 1024, 20)) == 6
    assert grid.index(flavors.VmType(2, 4096, 20)) == 10
    assert grid.index(flavors.VmType(4, 1024, 20)) == 12
    assert grid.index(grid.largest) == 17


def test_index_matches_types_order(grid):
    assert [grid.index(t) for t in grid.types] == list(range(18))


def test_index_on_uneven_grid():
    grid = flavors.parse_grid('1,2 x 512,1024,2048,4096 x 10,20,30')
    assert len(grid.types) == 24
    assert [grid.index(t) for t in grid.types] == list(range(24))
    assert grid.index(flavors.VmType(2, 512, 10)) == 12
    assert grid.index(flavors.VmType(1, 1024, 30)) == 5


@pytest.mark.parametrize('vm_type', [
    flavors.VmType(3, 1024, 20),
    flavors.VmType(1, 1000, 20),
    flavors.VmType(1, 1024, 30),
])
def test_index_of_a_type_not_in_the_grid(grid, vm_type):
    with pytest.raises(exception.InvalidRequest, match='not a type'):
        grid.index(vm_type)


# -- round_down -----------------------------------------------------------


@pytest.mark.parametrize('request_, expected', [
    # exact values stay
    ((1, 1024, 20), (1, 1024, 20)),
    ((2, 2048, 40), (2, 2048, 40)),
    ((4, 4096, 40), (4, 4096, 40)),
    # each dimension rounds down on its own
    ((3, 1024, 20), (2, 1024, 20)),
    ((1, 3000, 20), (1, 2048, 20)),
    ((1, 1024, 39), (1, 1024, 20)),
    ((3, 4095, 39), (2, 2048, 20)),
    ((2, 4097, 21), (2, 4096, 20)),
    # under the smallest: raised to it (0 included)
    ((0, 1024, 20), (1, 1024, 20)),
    ((1, 1, 20), (1, 1024, 20)),
    ((1, 1023, 0), (1, 1024, 20)),
    ((0, 0, 0), (1, 1024, 20)),
    ((1, 1024, 19), (1, 1024, 20)),
    # above the largest: the largest
    ((1024, 16777216, 65536), (4, 4096, 40)),
    ((5, 1024, 20), (4, 1024, 20)),
    ((1, 8192, 20), (1, 4096, 20)),
    ((1, 1024, 41), (1, 1024, 40)),
])
def test_round_down(grid, request_, expected):
    assert grid.round_down(*request_) == flavors.VmType(*expected)


def test_round_down_result_is_always_in_the_grid(grid):
    types = set(grid.types)
    for vcpus in range(10):
        for memory in (0, 1, 1023, 1024, 1500, 2048, 4000, 5000):
            for disk in (0, 19, 20, 39, 40, 100):
                assert grid.round_down(vcpus, memory, disk) in types


# -- VmType ---------------------------------------------------------------


def test_vm_type_key_and_list():
    vm_type = flavors.VmType(2, 2048, 40)
    assert vm_type.key == '2_2048_40'
    assert vm_type.as_list() == [2, 2048, 40]


def test_vm_type_is_frozen_and_ordered():
    small = flavors.VmType(1, 1024, 20)
    with pytest.raises(AttributeError):
        small.vcpus = 2  # type: ignore[misc]
    assert small < flavors.VmType(1, 1024, 40) < flavors.VmType(2, 512, 0)
    assert hash(small) == hash(flavors.VmType(1, 1024, 20))


# -- python -m rapid_vmm.flavors ---------------------------------------------


def test_command_prints_every_type_in_order(capsys):
    assert flavors.main(['1,2 x 1024,2048 x 20']) == 0
    assert capsys.readouterr().out.splitlines() == [
        '1_1024_20 1 1024 20', '1_2048_20 1 2048 20',
        '2_1024_20 2 1024 20', '2_2048_20 2 2048 20']


def test_command_default_grid_has_the_18_types(capsys):
    assert flavors.main([DEFAULT]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 18
    grid = flavors.parse_grid(DEFAULT)
    assert [line.split()[0] for line in lines] == [t.key for t in grid.types]


@pytest.mark.parametrize('argv, status', [
    (['1,2 x 1024'], 1), (['1 x 1024 x 20,x'], 1), (['2,1 x 1 x 1'], 1),
    ([], 2), (['1 x 1 x 1', 'extra'], 2)])
def test_command_refuses_with_one_line(capsys, argv, status):
    assert flavors.main(argv) == status
    captured = capsys.readouterr()
    assert captured.out == ''
    assert len(captured.err.strip().splitlines()) == 1


def test_command_as_a_module():
    root = os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.dirname(os.path.abspath(__file__)))))
    ok = subprocess.run([sys.executable, '-m', 'rapid_vmm.flavors',
                         '1 x 512 x 0'], cwd=root, capture_output=True,
                        text=True, timeout=60, check=False)
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, '1_512_0 1 512 0\n',
                                                     '')
    bad = subprocess.run([sys.executable, '-m', 'rapid_vmm.flavors',
                          'lots'], cwd=root, capture_output=True, text=True,
                         timeout=60, check=False)
    assert bad.returncode == 1
    assert bad.stdout == ''
    assert bad.stderr.startswith('rapid_vmm.flavors: Bad configuration: ')
    assert len(bad.stderr.splitlines()) == 1
