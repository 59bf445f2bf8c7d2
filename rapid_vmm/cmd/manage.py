"""``rapid-vmm-manage``: operator commands that are not RPC calls.

``import-legacy`` migrates a host from the original Java VMM: it reads the
original's ``configuration.xml`` and its state files (``vmmInfo.out``,
``vmList.out`` in the original's ``dataPath``), writes the matching
rapid-vmm options to a configuration file and imports the VMM id, the
SLAM's address and the VM records into rapid-vmm's state, so the host keeps
its DS registration and its VMs. See ``doc/source/legacy.md``.

Examples::

    rapid-vmm-manage --config-file /etc/rapid-vmm/rapid-vmm.conf \\
        import-legacy /home/rapid/rapid_vmm_ds/bin/configuration.xml \\
        --dry-run
    rapid-vmm-manage --config-file /etc/rapid-vmm/rapid-vmm.conf \\
        import-legacy /home/rapid/rapid_vmm_ds/bin/configuration.xml \\
        --output-config /etc/rapid-vmm/rapid-vmm.conf.d/legacy-import.conf

The agent's own configuration (``--config-file``) gives ``data_path`` (where
the state is written) and ``host`` (the state's identity). Exit status: 0
done, 1 refused or unreadable input (one line on stderr, nothing changed),
2 bad command line or configuration.
"""

import sys

from oslo_config import cfg

from rapid_vmm import exception
from rapid_vmm import state
from rapid_vmm import version
from rapid_vmm.conf import CONF
from rapid_vmm.legacy import importer

DEFAULT_OUTPUT = '/etc/rapid-vmm/rapid-vmm.conf.d/legacy-import.conf'


def _add_import_legacy(subparsers) -> None:
    parser = subparsers.add_parser(
        'import-legacy',
        help='import a host of the original Java VMM (configuration and '
             'state)')
    parser.add_argument('configuration_xml',
                        help='the original VMM\'s configuration.xml')
    parser.add_argument('--legacy-data-path', default=None,
                        help='the original\'s state directory (vmmInfo.out, '
                             'vmList.out); default: its <dataPath>')
    parser.add_argument('--output-config', default=DEFAULT_OUTPUT,
                        help='the rapid-vmm configuration file to write '
                             f'(default: {DEFAULT_OUTPUT}, which rapid-vmm '
                             'reads from its configuration directory)')
    parser.add_argument('--force', action='store_true',
                        help='replace --output-config if it exists')
    parser.add_argument('--dry-run', action='store_true',
                        help='print what would be done; write nothing')
    parser.set_defaults(func=import_legacy)


def import_legacy(conf: cfg.ConfigOpts) -> int:
    args = conf.command
    plan = importer.plan(args.configuration_xml, host=conf.host,
                         data_dir=args.legacy_data_path)
    print(plan.describe())
    store = state.StateStore(conf.data_path)
    if args.dry_run:
        print(f'\nWould write {args.output_config}:\n')
        print(importer.render_config(plan.config, plan.settings,
                                     mask_secrets=True))
        print(f'Would import the identity and {len(plan.vms)} VMs into '
              f'{store.path} (checked then: it must have no other VMM id '
              'and no VM record). Dry run: nothing written.')
        return 0
    text = importer.render_config(plan.config, plan.settings)
    store.open()
    try:
        importer.check_state(store, plan)
        importer.write_config(args.output_config, text, force=args.force)
        importer.apply(store, plan)
    finally:
        store.close()
    print(f'\nWrote {args.output_config}; imported the identity and '
          f'{len(plan.vms)} VMs into {store.path}.')
    print('Next: stop the original VMM for good, then start rapid-vmm '
          'with this configuration (see doc/source/legacy.md).')
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    conf = CONF
    conf.register_cli_opt(cfg.SubCommandOpt(
        'command', title='Commands', handler=_add_commands,
        help='what to do'))
    try:
        conf(argv, project='rapid-vmm', prog='rapid-vmm-manage',
             version=version.version_string())
    except cfg.Error as exc:
        print(f'rapid-vmm-manage: {exc}', file=sys.stderr)
        return 2
    try:
        return conf.command.func(conf)
    except (importer.ImportError_, importer.ImportRefused,
            exception.StateError) as exc:
        print(f'rapid-vmm-manage: {exc}', file=sys.stderr)
        return 1
    except OSError as exc:
        print(f'rapid-vmm-manage: {exc}', file=sys.stderr)
        return 1


def _add_commands(subparsers) -> None:
    _add_import_legacy(subparsers)


if __name__ == '__main__':
    sys.exit(main())
