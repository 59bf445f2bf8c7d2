"""Migrating a host from the original Java VMM (SPEC section 7).

Three inputs, all read as data:

* ``configuration.xml`` (the original's settings) becomes rapid-vmm
  options: :func:`read_configuration`, :func:`map_configuration`,
  :func:`render_config` (every element's mapping is in
  ``doc/source/legacy.md``);
* ``vmmInfo.out`` (the VMM id and the SLAM's address) and ``vmList.out``
  (the VMs with their DS ids) are Java-serialized objects; they are parsed
  by :mod:`rapid_vmm.legacy.serialized` (a grammar reader that never loads
  a class) and accepted only as the original's classes, with the
  serialVersionUIDs and field types of the original sources. Nested
  third-party objects (the openstack4j flavor of Nova mode) are skipped.

:func:`plan` reads and checks everything first and returns an
:class:`ImportPlan`; nothing is written before the plan is complete, so a
corrupt, truncated or unexpected file is a clear :class:`ImportError_`
and changes nothing. :func:`check_state` refuses a state that already has
another VMM id, another host or any VM record; :func:`apply` then writes
the identity and the records through the state store's public methods.

Imported records carry ``intent = {'import': 'legacy'}``: their domain (or
server) has no rapid-vmm metadata, and reconciliation adopts it by name.
"""

import dataclasses
import os
import time
from typing import Any

from defusedxml import ElementTree
from oslo_log import log as logging

from rapid_vmm import exception
from rapid_vmm import objects
from rapid_vmm.legacy import serialized

LOG = logging.getLogger(__name__)

VMM_INFO_FILE = 'vmmInfo.out'
VM_LIST_FILE = 'vmList.out'

#: The original's classes: serialVersionUID and the field types read.
VMM_INFO_CLASS = 'eu.rapid.vmm.VmmInfo'
VMM_INFO_SUID = -1596628414770206114
SLAM_INFO_CLASS = 'eu.rapid.vmm.SlamInfo'
SLAM_INFO_SUID = 1
VM_INFO_CLASS = 'eu.rapid.vmm.VmInfo'
VM_INFO_SUID = -7722698437532950775

ARRAYLIST = 'java.util.ArrayList'
ARRAYLIST_SUID = 8683452581122892189
#: What ``Collections.synchronizedList`` serializes as (the original's
#: lists are such whenever the VMM started without a state file).
SYNC_LIST = 'java.util.Collections$SynchronizedList'
SYNC_RANDOM_LIST = 'java.util.Collections$SynchronizedRandomAccessList'
SYNC_COLLECTION = 'java.util.Collections$SynchronizedCollection'
LIST_WRAPPERS = {SYNC_LIST: -7754090372962971524,
                 SYNC_RANDOM_LIST: 1530674583602358482,
                 SYNC_COLLECTION: 3053995032091335093}

VMM_INFO_FIELDS = {'vmmId': 'J', 'slamInfo': 'L', 'vmImageFreeList': 'L'}
SLAM_INFO_FIELDS = {'ipv4': 'L', 'port': 'I'}
VM_INFO_FIELDS = {'vmName': 'L', 'vmIdByLM': 'L', 'vmid': 'J',
                  'vcpuNum': 'I', 'memSize': 'I', 'gpuCore': 'I',
                  'diskSize': 'I', 'userid': 'J', 'status': 'I',
                  'helperVmNum': 'I', 'vmImagePath': 'L',
                  'vmImageId': 'L', 'ipAddress': 'L', 'asSync': 'Z',
                  'osType': 'I', 'flavor': 'L'}

MAX_STATE_FILE = 16 * 1024 * 1024
MAX_CONFIG_FILE = 1024 * 1024


class ImportError_(exception.RapidVmmException):
    """The original's files cannot be imported; nothing was changed."""

    msg_fmt = 'Cannot import %(path)s: %(reason)s'


class ImportRefused(exception.RapidVmmException):
    """The rapid-vmm state already holds something else."""

    msg_fmt = 'Refusing to import into %(path)s: %(reason)s'


# ---------------------------------------------------------------------------
# configuration.xml
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Setting:
    """One rapid-vmm option written from the original's configuration."""

    group: str
    name: str
    value: str
    source: str
    note: str = ''
    secret: bool = False
    commented: bool = False


#: configuration.xml elements that become no option, and why.
NOT_MAPPED = {
    'description': 'free text; written as a comment',
    'availableType': 'rapid-vmm computes the available types from free '
                     'resources at every report',
    'dataPath': 'where the original\'s state is read from; rapid-vmm keeps '
                'its own state in [DEFAULT] data_path',
    'vmShellPath': 'rapid-vmm asks the hypervisor whether a VM exists',
}

#: Element -> (group, option) when the value is copied as it is.
DIRECT = {
    'vmmPort': ('legacy', 'port'),
    'vmmMaxConnection': ('DEFAULT', 'max_concurrent_requests'),
    'linuxNormalVmImageId': ('nova', 'linux_image'),
    'linuxHelperVmImageId': ('nova', 'linux_helper_image'),
    'androidNormalVmImageId': ('nova', 'android_image'),
    'androidHelperVmImageId': ('nova', 'android_helper_image'),
    'authAddress': ('nova', 'auth_url'),
    'openStackUserId': ('nova', 'user_id'),
    'openStackPasswd': ('nova', 'password'),
    'projectId1': ('nova', 'project_id'),
    'projectId2': ('nova', 'project_domain_id'),
    'networkId': ('nova', 'network'),
    'publicKey': ('nova', 'key_name'),
    'offloadingSecurity': ('nova', 'security_group'),
    'normalVmImagePath': ('libvirt', 'normal_image'),
    'vmImageFolder': ('libvirt', 'images_path'),
    'gpuCores': ('gpu', 'total_cores'),
    'nvidiaSmiPath': ('gpu', 'nvidia_smi_path'),
    'gpuDeviceNum': ('gpu', 'devices'),
    'dsIpAddress': ('legacy', 'ds_host'),
    'dsPort': ('legacy', 'ds_port'),
}
FLAVOR_ELEMENTS = {'defaultFlavorId': '1_1024_20',
                   'type2_1024_20FlavorId': '2_1024_20',
                   'type4_1024_20FlavorId': '4_1024_20'}
HANDLED = (set(NOT_MAPPED) | set(DIRECT) | set(FLAVOR_ELEMENTS) |
           {'vmmIpAddress', 'openStackSupport', 'helperVmImagePath1',
            'helperVmImagePath2', 'ipShellPath'})
INTEGER_ELEMENTS = ('vmmPort', 'vmmMaxConnection', 'gpuCores',
                    'gpuDeviceNum', 'dsPort', 'openStackSupport')
#: The original's defaults when configuration.xml has no <DS> element.
ORIGINAL_DS = ('127.0.0.1', '9001')


@dataclasses.dataclass
class Configuration:
    """The elements of the original's configuration.xml."""

    path: str
    elements: dict[str, str]
    unknown: list[str]

    @property
    def openstack(self) -> bool:
        return self.elements.get('openStackSupport', '0').strip() == '1'


def read_configuration(path: str) -> Configuration:
    """Read the ``VMM`` and ``DS`` elements of a configuration.xml.

    The original reads each element with an XPath ``//*/name`` (first
    match anywhere); so does this.

    :raises ImportError_: unreadable, not XML, no ``VMM`` element, or an
        integer element that is not one.
    """
    data = _read_file(path, MAX_CONFIG_FILE)
    try:
        root = ElementTree.fromstring(data, forbid_dtd=True)
    except Exception as exc:  # noqa: BLE001 - expat, defusedxml errors
        raise ImportError_(path=path,
                           reason=f'not a readable XML file: {exc}') from None
    vmm = root if root.tag == 'VMM' else root.find('.//VMM')
    if vmm is None:
        raise ImportError_(path=path, reason='no <VMM> element: not the '
                                             'original VMM\'s '
                                             'configuration.xml')
    elements: dict[str, str] = {}
    unknown: list[str] = []
    sections = [vmm]
    ds = root.find('.//DS')
    if ds is not None:
        sections.append(ds)
    description = root.find('.//description')
    if description is not None:
        elements['description'] = (description.text or '').strip()
    for section in sections:
        for child in section:
            if not isinstance(child.tag, str):
                continue
            if len(child):
                unknown.append(child.tag)
                continue
            elements.setdefault(child.tag, (child.text or '').strip())
            if child.tag not in HANDLED:
                unknown.append(child.tag)
    for name in INTEGER_ELEMENTS:
        value = elements.get(name)
        if value is not None and value != '' and not _is_int(value):
            raise ImportError_(path=path,
                               reason=f'<{name}> is {value!r}, not an '
                                      'integer')
    return Configuration(path=path, elements=elements, unknown=unknown)


def _is_int(value: str) -> bool:
    try:
        int(value)
    except ValueError:
        return False
    return True


def map_configuration(config: Configuration) -> list[Setting]:
    """The rapid-vmm options of the original's configuration."""
    elements = config.elements
    settings: list[Setting] = [
        Setting('DEFAULT', 'peer_protocol', 'legacy', '-',
                'the original DS and SLAM keep working unchanged'),
        Setting('legacy', 'enabled', 'true', '-',
                'serve the original protocol to the SLAM, AS and DS'),
    ]

    def add(group, name, value, source, note='', **kwargs):
        settings.append(Setting(group, name, value, source, note, **kwargs))

    if 'openStackSupport' in elements:
        add('DEFAULT', 'compute_driver',
            'nova' if config.openstack else 'libvirt', 'openStackSupport',
            '1 = OpenStack, otherwise libvirt')
    ip = elements.get('vmmIpAddress')
    if ip:
        add('DEFAULT', 'my_ip', ip, 'vmmIpAddress',
            'the address the DS knows this VMM by: keep it')
        add('legacy', 'bind_host', ip, 'vmmIpAddress',
            'serve the legacy port on the management address only')
    for element, (group, name) in DIRECT.items():
        value = elements.get(element)
        if value is None or value == '':
            continue
        note = ''
        if element == 'vmmPort':
            note = 'must equal the DS\'s <vmmPort>: the DS reaches VMMs there'
        elif element == 'projectId2':
            note = ('the original passes it as the second identifier of '
                    'its Keystone v3 log-in (openstack4j: the domain of '
                    'the project); check it')
        elif element == 'openStackUserId':
            note = ('the original logs in with this user id (if it is a '
                    'name, rename the option to username)')
        elif element == 'gpuDeviceNum':
            note = 'the original reported one GPU; rapid-vmm reports all ' \
                   'listed here'
        add(group, name, value, element, note,
            secret=element == 'openStackPasswd')
    if elements.get('authAddress'):
        add('nova', 'auth_type', 'password', 'authAddress',
            'Keystone password log-in, as the original')
    if 'dsIpAddress' not in elements:
        add('legacy', 'ds_host', ORIGINAL_DS[0], '-',
            'no <DS> element: the original\'s default DS address')
    if 'dsPort' not in elements:
        add('legacy', 'ds_port', ORIGINAL_DS[1], '-',
            'no <DS> element: the original\'s default DS port')
    flavors = [f'{key}:{elements[element]}'
               for element, key in FLAVOR_ELEMENTS.items()
               if elements.get(element)]
    if flavors:
        add('nova', 'flavors', ','.join(flavors),
            ', '.join(e for e in FLAVOR_ELEMENTS if elements.get(e)),
            'the original\'s flavor of each of these VM types')
    helpers = [elements[e] for e in ('helperVmImagePath1',
                                     'helperVmImagePath2') if elements.get(e)]
    if helpers:
        add('libvirt', 'helper_images', ','.join(helpers),
            'helperVmImagePath1, helperVmImagePath2',
            'the templates of helper VMs 1 and 2')
    if elements.get('ipShellPath'):
        add('libvirt', 'ip_command', elements['ipShellPath'], 'ipShellPath',
            'rapid-vmm finds addresses itself (ip_sources: DHCP lease, '
            'guest agent, ARP); remove the comment to keep using the '
            'original\'s script (run without a shell, domain name appended)',
            commented=True)
    return settings


def render_config(config: Configuration, settings: list[Setting],
                  mask_secrets: bool = False) -> str:
    """The settings as an oslo.config file, each with where it came from."""
    lines = ['# rapid-vmm options imported from the original VMM\'s',
             f'# {config.path} by "rapid-vmm-manage import-legacy" on',
             f'# {time.strftime("%Y-%m-%d %H:%M:%S %Z")}.']
    if config.elements.get('description'):
        lines.append(f'# <description>: {config.elements["description"]}')
    for name, why in NOT_MAPPED.items():
        if name in config.elements and name != 'description':
            lines.append(f'# <{name}> not mapped: {why}.')
    for name in config.unknown:
        lines.append(f'# <{name}> not recognised: ignored.')
    groups: dict[str, list[Setting]] = {}
    for setting in settings:
        groups.setdefault(setting.group, []).append(setting)
    for group in sorted(groups, key=lambda g: (g != 'DEFAULT', g)):
        lines += ['', f'[{group}]']
        for setting in groups[group]:
            origin = ('' if setting.source == '-'
                      else f'<{setting.source}>')
            comment = '; '.join(x for x in (origin, setting.note) if x)
            if comment:
                lines.append(f'# {comment}')
            value = '***' if setting.secret and mask_secrets \
                else setting.value
            prefix = '#' if setting.commented else ''
            lines.append(f'{prefix}{setting.name} = {value}')
    return '\n'.join(lines) + '\n'


def write_config(path: str, text: str, force: bool = False) -> None:
    """Write ``text`` to ``path`` atomically, mode 0600 (it may hold the
    OpenStack password). :raises ImportRefused: when ``path`` exists and
    ``force`` is not given."""
    if os.path.exists(path) and not force:
        raise ImportRefused(path=path, reason='the file exists (use --force '
                                              'to replace it)')
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temp = f'{path}.tmp-{os.getpid()}'
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, 'w', encoding='utf-8') as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


# ---------------------------------------------------------------------------
# vmmInfo.out and vmList.out
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class LegacyIdentity:
    vmm_id: int | None
    slam_host: str | None
    slam_port: int | None
    saved_at: float
    image_pool: list[str]


def _read_file(path: str, limit: int) -> bytes:
    try:
        with open(path, 'rb') as source:
            data = source.read(limit + 1)
    except OSError as exc:
        raise ImportError_(path=path, reason=exc.strerror or str(exc)
                           ) from None
    if len(data) > limit:
        raise ImportError_(path=path, reason=f'larger than {limit} bytes')
    return data


def _load(path: str) -> Any:
    data = _read_file(path, MAX_STATE_FILE)
    try:
        return serialized.load_one(data)
    except serialized.SerializedFormatError as exc:
        raise ImportError_(path=path, reason=str(exc)) from None


class _Checker:
    """Whitelist checks of one file: every error names the file."""

    def __init__(self, path: str):
        self.path = path

    def fail(self, reason: str) -> ImportError_:
        return ImportError_(path=self.path, reason=reason)

    def obj(self, value: Any, name: str, suid: int,
            fields: dict[str, str]) -> dict[str, Any]:
        """The fields of ``value``, an object of exactly class ``name``."""
        if not isinstance(value, serialized.JavaObject):
            raise self.fail(f'{_describe(value)} where a {name} was '
                            'expected')
        if value.class_name != name:
            raise self.fail(f'an object of class {value.class_name[:100]!r} '
                            f'where a {name} was expected (only the '
                            'original VMM\'s classes are read)')
        if value.cls.suid != suid:
            raise self.fail(f'{name} has serialVersionUID '
                            f'{value.cls.suid}, not the original\'s {suid}')
        if value.cls.superclass is not None:
            raise self.fail(f'{name} has a superclass '
                            f'{value.cls.superclass.name[:100]!r}')
        declared = {field: code for code, field, _sig in value.cls.fields}
        for field, code in fields.items():
            if declared.get(field) != code:
                raise self.fail(f'{name}.{field} is missing or of another '
                                'type')
        return value.fields()

    def string(self, value: Any, what: str) -> str | None:
        if value is not None and not isinstance(value, str):
            raise self.fail(f'{what} is {_describe(value)}, not a string')
        return value

    def string_list(self, value: Any, what: str) -> list:
        """The items of an ``ArrayList`` (or a synchronized list)."""
        if not isinstance(value, serialized.JavaObject):
            raise self.fail(f'{what} is {_describe(value)}, not a list')
        if value.class_name in LIST_WRAPPERS:
            for level in value.cls.hierarchy():
                if LIST_WRAPPERS.get(level.name) != level.suid:
                    raise self.fail(f'{what}: unexpected list wrapper '
                                    f'{level.name[:100]!r}')
            fields = value.fields()
            inner = fields.get('list', fields.get('c'))
            if inner is value:
                raise self.fail(f'{what}: the list wraps itself')
            return self.string_list(inner, what)
        self.obj(value, ARRAYLIST, ARRAYLIST_SUID, {'size': 'I'})
        size = value.fields()['size']
        annotation = value.annotations.get(ARRAYLIST, [])
        if not annotation or not isinstance(annotation[0],
                                            serialized.BlockData) \
                or len(annotation[0]) != 4:
            raise self.fail(f'{what}: no list capacity')
        items = annotation[1:]
        if size < 0 or len(items) != size:
            raise self.fail(f'{what}: {len(items)} items for a size of '
                            f'{size}')
        return items


def _describe(value: Any) -> str:
    if value is None:
        return 'null'
    if isinstance(value, serialized.JavaObject):
        return f'an object of class {value.class_name[:100]!r}'
    if isinstance(value, str):
        return 'a string'
    return type(value).__name__


def read_vmm_info(path: str) -> LegacyIdentity:
    """The identity in the original's ``vmmInfo.out``.

    :raises ImportError_: when it is not the original's ``VmmInfo``.
    """
    check = _Checker(path)
    fields = check.obj(_load(path), VMM_INFO_CLASS, VMM_INFO_SUID,
                       VMM_INFO_FIELDS)
    vmm_id = fields['vmmId']
    if vmm_id < 0:
        raise check.fail(f'VMM id {vmm_id}')
    slam_host = slam_port = None
    if fields['slamInfo'] is not None:
        slam = check.obj(fields['slamInfo'], SLAM_INFO_CLASS,
                         SLAM_INFO_SUID, SLAM_INFO_FIELDS)
        slam_host = check.string(slam['ipv4'], 'SlamInfo.ipv4')
        slam_port = slam['port']
        if not 0 < slam_port < 65536:
            raise check.fail(f'SLAM port {slam_port}')
    pool = []
    if fields['vmImageFreeList'] is not None:
        for item in check.string_list(fields['vmImageFreeList'],
                                      'vmImageFreeList'):
            pool.append(check.string(item, 'an image of vmImageFreeList'))
    return LegacyIdentity(vmm_id=vmm_id or None, slam_host=slam_host,
                          slam_port=slam_port,
                          saved_at=os.path.getmtime(path), image_pool=pool)


def read_vm_list(path: str, openstack: bool) -> tuple[list[objects.Vm],
                                                      list[str]]:
    """The VM records of the original's ``vmList.out`` and notes.

    :param openstack: the original ran in OpenStack mode (``vmIdByLM`` is
        then the Nova server id and ``vmName`` the server's name).
    :raises ImportError_: when it is not a list of the original's
        ``VmInfo``, or a record is inconsistent.
    """
    check = _Checker(path)
    vms: list[objects.Vm] = []
    notes: list[str] = []
    for index, item in enumerate(check.string_list(_load(path), 'the list')):
        fields = check.obj(item, VM_INFO_CLASS, VM_INFO_SUID, VM_INFO_FIELDS)
        vm = _vm_record(check, index, fields, openstack, notes)
        vms.append(vm)
    users = [vm.user_id for vm in vms]
    if len(set(users)) != len(users):
        raise check.fail('two VMs of one user')
    names = [vm.name for vm in vms]
    if len(set(names)) != len(names):
        raise check.fail('two VMs of one name')
    return vms, notes


def _vm_record(check: _Checker, index: int, fields: dict, openstack: bool,
               notes: list[str]) -> objects.Vm:
    where = f'VM {index + 1}'
    strings = {name: check.string(fields[name], f'{where} {name}')
               for name in ('vmName', 'vmIdByLM', 'vmImagePath',
                            'vmImageId', 'ipAddress')}
    user_id, helper = fields['userid'], fields['helperVmNum']
    status, os_type = fields['status'], fields['osType']
    if status not in tuple(objects.VmStatus):
        raise check.fail(f'{where}: status {status}')
    if os_type not in tuple(objects.OsType):
        raise check.fail(f'{where}: OS type {os_type}')
    if helper < 0 or (helper and user_id != -helper) or \
            (not helper and user_id <= 0):
        raise check.fail(f'{where}: user {user_id} with helper index '
                         f'{helper}')
    sizes = {'vcpus': fields['vcpuNum'], 'memory_mb': fields['memSize'],
             'disk_gb': fields['diskSize'], 'gpu_cores': fields['gpuCore']}
    for name, value in sizes.items():
        if value < 0:
            raise check.fail(f'{where}: {name} {value}')
    if openstack:
        name, driver_id = strings['vmName'], strings['vmIdByLM']
        if not driver_id:
            raise check.fail(f'{where}: no Nova server id (vmIdByLM)')
    else:
        name, driver_id = strings['vmIdByLM'], None
    if not name:
        raise check.fail(f'{where}: no {"server" if openstack else "domain"}'
                         ' name')
    if fields['flavor'] is not None:
        notes.append(f'{name}: its openstack4j flavor object was skipped '
                     '(the record\'s sizes are used)')
    if not all((sizes['vcpus'], sizes['memory_mb'])):
        notes.append(f'{name}: the original recorded no size (vCPUs '
                     f'{sizes["vcpus"]}, memory {sizes["memory_mb"]} MB); '
                     'reconciliation reads it from the instance')
    intent: dict[str, Any] = {'import': 'legacy'}
    if helper and not openstack:
        # The original runs a helper on its template image itself.
        intent['keep_disk'] = True
    vm_id = fields['vmid'] or None
    return objects.Vm(
        user_id=user_id, name=name, vm_id=vm_id, status=status,
        os_type=os_type, helper=helper, driver_id=driver_id,
        disk_path=None if openstack else strings['vmImagePath'],
        image=strings['vmImageId'] if openstack else None,
        ip_address=strings['ipAddress'] or None,
        as_ready=bool(fields['asSync']),
        as_protocol=None if helper else 'legacy', intent=intent, **sizes)


# ---------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class ImportPlan:
    config: Configuration
    settings: list[Setting]
    data_dir: str
    identity: LegacyIdentity | None
    vms: list[objects.Vm]
    notes: list[str]
    host: str

    def meta(self) -> dict[str, Any]:
        """What :meth:`StateStore.set_meta` is given."""
        meta: dict[str, Any] = {'host': self.host}
        identity = self.identity
        if identity is not None and identity.vmm_id is not None:
            meta.update(vmm_id=identity.vmm_id,
                        slam_host=identity.slam_host,
                        slam_port=identity.slam_port,
                        registered_at=identity.saved_at)
        return meta

    def describe(self) -> str:
        """What the import does, for people (secrets masked)."""
        lines = [f'Original configuration: {self.config.path}',
                 f'Original state: {self.data_dir}']
        identity = self.identity
        if identity is None or identity.vmm_id is None:
            lines.append('VMM id: none (the original never registered; '
                         'rapid-vmm registers with the DS)')
        else:
            lines.append(f'VMM id: {identity.vmm_id} (kept: the DS refuses '
                         'a second registration from this IP)')
            lines.append(f'SLAM: {identity.slam_host}:{identity.slam_port}')
        if identity is not None and identity.image_pool:
            lines.append(f'Not imported: {len(identity.image_pool)} '
                         'prepared image copies of the original\'s pool '
                         f'(rapid-vmm makes overlays): '
                         f'{", ".join(identity.image_pool)}')
        lines.append(f'Host (identity of the state): {self.host}')
        lines.append(f'VMs: {len(self.vms)}')
        for vm in self.vms:
            lines.append(
                f'  user {vm.user_id}: {vm.name} DS id {vm.vm_id} status '
                f'{objects.VmStatus(vm.status).name.lower()} {vm.vcpus} '
                f'vCPU {vm.memory_mb} MB {vm.disk_gb} GB gpu '
                f'{vm.gpu_cores} os '
                f'{objects.OsType(vm.os_type).name.lower()} helper '
                f'{vm.helper} ip {vm.ip_address}'
                + (f' server {vm.driver_id}' if vm.driver_id else '')
                + (f' disk {vm.disk_path}' if vm.disk_path else ''))
        lines += [f'Note: {note}' for note in self.notes]
        return '\n'.join(lines)


def plan(configuration_xml: str, host: str,
         data_dir: str | None = None) -> ImportPlan:
    """Read and check every input; writes nothing.

    :param data_dir: the original's ``dataPath`` (default: the one its
        configuration names). A missing ``vmmInfo.out`` or ``vmList.out``
        is read as the original does: not registered, no VMs.
    :raises ImportError_: on the first input that cannot be imported.
    """
    config = read_configuration(configuration_xml)
    settings = map_configuration(config)
    if data_dir is None:
        data_dir = config.elements.get('dataPath') or ''
        if not data_dir:
            raise ImportError_(path=configuration_xml,
                               reason='no <dataPath>: give the original\'s '
                                      'state directory')
    if not os.path.isdir(data_dir):
        raise ImportError_(path=data_dir, reason='not a directory')
    notes: list[str] = []
    info_path = os.path.join(data_dir, VMM_INFO_FILE)
    identity = None
    if os.path.exists(info_path):
        identity = read_vmm_info(info_path)
    else:
        notes.append(f'{info_path} does not exist: the original never '
                     'registered')
    list_path = os.path.join(data_dir, VM_LIST_FILE)
    vms: list[objects.Vm] = []
    if os.path.exists(list_path):
        vms, vm_notes = read_vm_list(list_path, config.openstack)
        notes += vm_notes
    else:
        notes.append(f'{list_path} does not exist: no VMs')
    return ImportPlan(config=config, settings=settings, data_dir=data_dir,
                      identity=identity, vms=vms, notes=notes, host=host)


def check_state(store, import_plan: ImportPlan) -> None:
    """Refuse a state that holds another identity or any VM record.

    :param store: an open :class:`rapid_vmm.state.StateStore`.
    :raises ImportRefused:
    """
    meta = store.get_meta()
    wanted = import_plan.meta()
    for key in ('vmm_id', 'host'):
        current = meta.get(key)
        if current is not None and key in wanted and \
                current != wanted[key]:
            raise ImportRefused(path=store.path,
                                reason=f'it already has {key} {current!r} '
                                       f'(the import has {wanted[key]!r})')
    if meta.get('vmm_id') is not None and 'vmm_id' not in wanted:
        raise ImportRefused(path=store.path,
                            reason=f'it is registered as VMM '
                                   f'{meta["vmm_id"]}; the original was not')
    records = store.list_vms()
    if records:
        raise ImportRefused(path=store.path,
                            reason=f'it already has {len(records)} VM '
                                   'records')


def apply(store, import_plan: ImportPlan) -> None:
    """Write the plan's VM records and identity into ``store`` (open).

    Checks first (:func:`check_state`); the records go first and the
    identity last, and the records written are removed again if a later
    write fails, so the state is as before or fully imported.
    """
    check_state(store, import_plan)
    written: list[int] = []
    try:
        for vm in import_plan.vms:
            store.save_vm(vm.copy())
            written.append(vm.user_id)
        store.set_meta(**import_plan.meta())
    except Exception:
        for user_id in written:
            try:
                store.delete_vm(user_id)
            except Exception:
                LOG.exception('Could not undo the import of user %s',
                              user_id)
        raise
    LOG.info('Imported the original VMM\'s state from %s: VMM id %s, %d VMs',
             import_plan.data_dir, import_plan.meta().get('vmm_id'),
             len(import_plan.vms))
