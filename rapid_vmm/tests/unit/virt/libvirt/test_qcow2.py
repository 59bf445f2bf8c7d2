"""In-process qcow2 overlays are the ones qemu-img makes."""

import json
import os
import subprocess

import pytest

from rapid_vmm.virt.libvirt import qcow2

GiB = 1024 ** 3


def qemu_img(*args):
    return subprocess.run(['qemu-img', *args], check=True,
                          capture_output=True, text=True).stdout


def info(path):
    data = json.loads(qemu_img('info', '-U', '--output=json', path))
    data.pop('filename')
    data.pop('actual-size', None)
    return data


@pytest.fixture(params=['qcow2', 'raw'])
def template(tmp_path, request):
    path = tmp_path / f'template.{request.param}'
    qemu_img('create', '-q', '-f', request.param, str(path), '64M')
    return str(path), request.param


@pytest.mark.parametrize('size', [64 * 1024 * 1024, 20 * GiB, 4096 * GiB,
                                  65536 * GiB])
def test_same_image_as_qemu_img(tmp_path, template, size):
    backing, fmt = template
    ours = str(tmp_path / 'ours.qcow2')
    theirs = str(tmp_path / 'theirs.qcow2')
    qcow2.create_overlay(ours, backing, fmt, size)
    qemu_img('create', '-q', '-f', 'qcow2', '-F', fmt, '-b', backing,
             theirs, str(size))
    assert info(ours) == info(theirs)
    assert os.path.getsize(ours) == os.path.getsize(theirs)
    assert 'No errors were found' in qemu_img('check', ours)


def test_reads_the_backing_file_and_takes_writes(tmp_path):
    backing = str(tmp_path / 'base.qcow2')
    qemu_img('create', '-q', '-f', 'qcow2', backing, '64M')
    subprocess.run(['qemu-io', '-c', 'write -P 0x11 0 64k', backing],
                   check=True, capture_output=True)
    overlay = str(tmp_path / 'overlay.qcow2')
    qcow2.create_overlay(overlay, backing, 'qcow2', GiB)
    run = subprocess.run(
        ['qemu-io', '-c', 'read -P 0x11 0 64k', '-c',
         'write -P 0x22 1M 64k', '-c', 'read -P 0x22 1M 64k', overlay],
        capture_output=True, text=True, check=True)
    assert 'Pattern verification failed' not in run.stdout
    assert 'No errors were found' in qemu_img('check', overlay)
    # The template is untouched.
    subprocess.run(['qemu-io', '-c', 'read -P 0 1M 64k', backing],
                   check=True, capture_output=True)


def test_never_overwrites_and_leaves_nothing_on_bad_input(tmp_path):
    path = tmp_path / 'disk.qcow2'
    path.write_bytes(b'precious')
    with pytest.raises(FileExistsError):
        qcow2.create_overlay(str(path), '/t.qcow2', 'qcow2', GiB)
    assert path.read_bytes() == b'precious'
    fresh = tmp_path / 'new.qcow2'
    for args in (('', 'qcow2', GiB), ('/t', 'qc ow2', GiB),
                 ('/t', 'qcow2', 0), ('/t', 'qcow2', 1000),
                 ('/t\0x', 'qcow2', GiB), ('/' + 'x' * 2000, 'raw', GiB)):
        with pytest.raises(ValueError):
            qcow2.create_overlay(str(fresh), *args)
        assert not fresh.exists()


def test_l1_entries():
    assert qcow2.l1_entries(1) == 1
    assert qcow2.l1_entries(512 * 1024 ** 2) == 1
    assert qcow2.l1_entries(512 * 1024 ** 2 + 1) == 2
    assert qcow2.l1_entries(20 * GiB) == 40
