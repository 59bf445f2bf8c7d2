"""Benchmark: making an instance disk from a template (SPEC 9).

Measures, in one run, the project's own :class:`ImageBackend`
(``rapid_vmm.virt.libvirt.imagebackend``) making a VM disk:

- ``overlay_ms``: ``image_mode = overlay`` from a 1 GiB template of real
  data (a raw file of non-zero blocks, fsync-ed; ``--template-format
  qcow2`` converts it to a fully allocated qcow2 first): ``qemu-img create
  -f qcow2 -b TEMPLATE -F FORMAT``, spawned with ``subprocess.run``;
- ``overlay_8g_ms``: the same from an 8 GiB template (raw, sparse: data in
  its first and last MiB; an overlay never reads the data, so writing 8 GiB
  would only cost time), taken in turns with the 1 GiB overlays;
  ``overlay_8g_vs_1g`` = overlay_8g_ms / overlay_ms (target <= 1.5: the
  overlay is O(1) in the template's size);
- ``copy_ms``: ``image_mode = copy`` - a full copy of the 1 GiB template
  (``shutil.copyfile`` to ``<disk>.part``, then rename), median of
  ``--copies`` repetitions; ``copy_vs_overlay`` = copy_ms / overlay_ms
  (target >= 20).

Baselines and comparisons, same run: ``qemu_img_bare_ms`` (the same
``qemu-img create`` run bare through ``subprocess.run``: the floor of an
overlay; ``overlay_vs_bare``), ``processutils_create_ms`` (the same through
``oslo_concurrency.processutils.execute``, which forks the whole calling
process first: the way rapid-vmm once ran it), ``copy_durable_ms`` (the
copy plus an fsync: until the data is on disk; the agent itself does not
fsync), ``overlay_first_ms`` (the first overlay, with the one ``qemu-img
info`` of the template that ImageBackend then caches) and ``pool_take_ms``
(taking a disk that ``imagepool.ImagePool``, ``libvirt.image_pool_size`` >
0, prepared in the background).

The page cache is warm by default (the template was just written): the
copy reads it from memory, which favours the copy. ``--drop-caches`` (root
only; it drops the page cache of the whole machine) runs
``sync; echo 3 > /proc/sys/vm/drop_caches`` before every timed copy and
overlay (then reloads ``qemu-img`` itself, which is always hot on a real
host), so that the template is read from disk.

Run: ``python benchmarks/bench_image_prep.py [--copies 5] [--overlays 20]
[--drop-caches] [--template-format raw|qcow2] [--dir DIR]``. Prints
readable figures, then one JSON line. Needs ~2.2 GiB free in ``--dir``
(default: the system temp directory) and ~15-40 s.
"""

import os
import shutil
import statistics
import subprocess
import sys
import time

import _common
from oslo_concurrency import processutils

from rapid_vmm.virt.libvirt import imagebackend

GiB = 1024 ** 3
TARGETS = {'copy_vs_overlay': 20.0, 'overlay_8g_vs_1g': 1.5}


def write_sparse_template(path: str, size: int) -> None:
    """A raw file of ``size`` bytes, data only in its first and last MiB."""
    block = os.urandom(1024 * 1024)
    with open(path, 'wb') as out:
        out.write(block)
        out.seek(size - len(block))
        out.write(block)


def write_template(path: str, size: int) -> float:
    """A raw file of ``size`` bytes of non-zero data, on disk."""
    block = os.urandom(4 * 1024 * 1024)
    started = time.perf_counter()
    with open(path, 'wb') as out:
        for _ in range(size // len(block)):
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    return time.perf_counter() - started


def settle(drop_caches: bool) -> None:
    """Write back dirty pages; with ``drop_caches``, empty the page cache
    and load ``qemu-img`` again, so that only the template is cold (the
    tool itself is always hot on a host that makes VMs)."""
    os.sync()
    if drop_caches:
        with open('/proc/sys/vm/drop_caches', 'w', encoding='ascii') as f:
            f.write('3\n')
        subprocess.run(['qemu-img', '--version'], check=True,
                       capture_output=True)


def measure_pool(images, template: str, takes: int):
    """Take a ready disk from :class:`ImagePool` (prepared untimed).

    Returns (milliseconds per take, note); ([], reason) when this tree has
    no image pool or its interface differs.
    """
    try:
        from rapid_vmm.virt.libvirt import imagepool
        pool = imagepool.ImagePool(images, template, takes, 1)
        for _ in range(takes):
            pool.prepare_one()
        times = []
        for i in range(takes):
            path = images.disk_path(f'rapid-bench-taken-{i}')
            started = time.perf_counter()
            if not pool.take(path, 1):
                return [], 'the pool gave no disk'
            times.append((time.perf_counter() - started) * 1000.0)
            images.delete(path)
        return times, 'ImagePool.take (disk prepared in the background)'
    except Exception as exc:  # noqa: BLE001 - optional figure
        return [], f'not measured: {type(exc).__name__}: {exc}'


def main(argv) -> int:
    parser = _common.arg_parser(__doc__)
    parser.add_argument('--copies', type=int, default=5)
    parser.add_argument('--overlays', type=int, default=20)
    parser.add_argument('--drop-caches', action='store_true',
                        help='drop the page cache before each timed step '
                             '(root; affects the whole machine)')
    parser.add_argument('--template-format', choices=('raw', 'qcow2'),
                        default='raw')
    parser.add_argument('--dir', default=None,
                        help='where the template and disks are made')
    args = _common.parse_args(parser, argv)
    if args.drop_caches and os.geteuid() != 0:
        parser.error('--drop-caches needs root')

    with _common.Workspace('image-prep') as ws:
        base = ws.path
        if args.dir:
            base = os.path.join(args.dir, f'rapid-bench-{ws.run_id}')
            os.makedirs(base)
            ws.add(shutil.rmtree, base, True)
        images = os.path.join(base, 'instances')
        raw = os.path.join(base, 'template.raw')
        write_s = write_template(raw, GiB)
        template = raw
        if args.template_format == 'qcow2':
            template = os.path.join(base, 'template.qcow2')
            subprocess.run(['qemu-img', 'convert', '-q', '-f', 'raw', '-O',
                            'qcow2', '-o', 'preallocation=metadata', raw,
                            template], check=True)
            os.unlink(raw)
        template_bytes = os.stat(template).st_blocks * 512
        big = os.path.join(base, 'template-8g.raw')
        write_sparse_template(big, 8 * GiB)

        overlay = imagebackend.ImageBackend(images, 'overlay')
        copy = imagebackend.ImageBackend(images, 'copy')
        overlay.ensure_directory()

        # -- overlays: 1 GiB and 8 GiB templates in turns, and baselines --
        settle(args.drop_caches)
        first_path = overlay.disk_path('rapid-bench-first')
        overlay_first = _common.timed_ms(overlay.create, template,
                                         first_path, 1)
        overlay.delete(first_path)
        overlay.template_info(big)  # cached, as after the first VM
        overlay_ms = []
        overlay_8g_ms = []
        bare_ms = []
        pu_ms = []
        info = overlay.template_info(template)
        for i in range(args.overlays):
            for source, times in ((template, overlay_ms),
                                  (big, overlay_8g_ms)):
                if args.drop_caches:
                    settle(True)
                path = overlay.disk_path(f'rapid-bench-overlay-{i}')
                times.append(_common.timed_ms(overlay.create, source,
                                              path, 1))
                overlay.delete(path)
            bare = os.path.join(images, f'bare-{i}.qcow2')
            bare_ms.append(_common.timed_ms(
                subprocess.run,
                ['qemu-img', 'create', '-q', '-f', 'qcow2', '-b',
                 os.path.abspath(template), '-F', info['format'], bare,
                 str(GiB)]))
            os.unlink(bare)
            spawned = os.path.join(images, f'spawned-{i}.qcow2')
            pu_ms.append(_common.timed_ms(
                processutils.execute,
                'qemu-img', 'create', '-q', '-f', 'qcow2', '-b',
                os.path.abspath(template), '-F', info['format'], spawned,
                str(GiB)))
            os.unlink(spawned)

        # -- copies -------------------------------------------------------
        copy.template_info(template)  # cached, as after the first VM
        copy_ms = []
        durable_ms = []
        copied_bytes = 0
        for i in range(args.copies):
            settle(args.drop_caches)
            path = copy.disk_path(f'rapid-bench-copy-{i}')
            started = time.perf_counter()
            copy.create(template, path, 1)
            copy_ms.append((time.perf_counter() - started) * 1000.0)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            durable_ms.append((time.perf_counter() - started) * 1000.0)
            copied_bytes = os.stat(path).st_blocks * 512
            copy.delete(path)
        settle(False)

        # -- image pool (libvirt.image_pool_size), when this tree has it ----
        pool_ms, pool_note = measure_pool(overlay, template,
                                          max(args.overlays // 2, 5))

    overlay_med = statistics.median(overlay_ms)
    overlay_8g_med = statistics.median(overlay_8g_ms)
    bare_med = statistics.median(bare_ms)
    copy_med = statistics.median(copy_ms)
    ratio = copy_med / overlay_med
    size_ratio = overlay_8g_med / overlay_med
    met = {'copy_vs_overlay': ratio >= TARGETS['copy_vs_overlay'],
           'overlay_8g_vs_1g': size_ratio <= TARGETS['overlay_8g_vs_1g']}
    result = {
        'overlay_ms': round(overlay_med, 2),
        'overlay_8g_ms': round(overlay_8g_med, 2),
        'overlay_8g_vs_1g': round(size_ratio, 2),
        'copy_ms': round(copy_med, 1),
        'copy_vs_overlay': round(ratio, 1),
        'qemu_img_bare_ms': round(bare_med, 2),
        'overlay_vs_bare': round(overlay_med / bare_med, 2),
        'processutils_create_ms': round(statistics.median(pu_ms), 2),
        'copy_durable_ms': round(statistics.median(durable_ms), 1),
        'overlay_first_ms': round(overlay_first, 2),
        'overlay': _common.describe(overlay_ms),
        'overlay_8g': _common.describe(overlay_8g_ms),
        'copy': _common.describe(copy_ms),
        'copy_durable': _common.describe(durable_ms),
        'template_bytes': template_bytes,
        'template_format': args.template_format,
        'template_8g': 'raw, sparse (data in its first and last MiB)',
        'copied_bytes': copied_bytes,
        'template_write_s': round(write_s, 2),
        'drop_caches': args.drop_caches,
        'pool_take_ms': (round(statistics.median(pool_ms), 3)
                         if pool_ms else None),
        'pool_note': pool_note,
        'overlay_tool': 'qemu-img create (subprocess.run)',
        'statistic': 'median',
        'targets': {'copy_vs_overlay': '>= 20', 'overlay_8g_vs_1g': '<= 1.5'},
        'targets_met': met,
        'all_targets_met': all(met.values()),
        **_common.machine(),
    }
    cache = 'dropped before each step' if args.drop_caches else 'warm'
    print(f'image preparation, 1 GiB {args.template_format} template '
          f'({template_bytes / GiB:.2f} GiB allocated), page cache {cache}')
    print(f'  overlay, 1 GiB template  p50 {overlay_med:8.2f} ms  p90 '
          f'{_common.percentile(overlay_ms, 90):8.2f} ms  (n='
          f'{len(overlay_ms)}; first, with qemu-img info: '
          f'{overlay_first:.1f} ms)')
    print(f'  overlay, 8 GiB template  p50 {overlay_8g_med:8.2f} ms  '
          f'(8g/1g {size_ratio:.2f}, target <= 1.5: '
          f'{_common.verdict(met["overlay_8g_vs_1g"])})')
    print(f'  bare qemu-img create     p50 {bare_med:8.2f} ms  (the floor; '
          f'through processutils.execute '
          f'{statistics.median(pu_ms):.2f} ms)')
    print(f'  copy (ImageBackend)      p50 {copy_med:8.1f} ms  max '
          f'{max(copy_ms):8.1f} ms  (n={len(copy_ms)}; with fsync '
          f'{statistics.median(durable_ms):.1f} ms)')
    if pool_ms:
        print(f'  pool take (image pool)   p50 '
              f'{statistics.median(pool_ms):8.3f} ms  (n={len(pool_ms)})')
    else:
        print(f'  pool take                {pool_note}')
    print(f'  copy_vs_overlay          {ratio:8.1f}      (target >= 20: '
          f'{_common.verdict(met["copy_vs_overlay"])})')
    return _common.emit(result)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
