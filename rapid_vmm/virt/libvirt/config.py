"""Domain XML of rapid-vmm VMs, built and read with ElementTree.

The domain carries our metadata in ``<metadata>`` under the namespace
:data:`METADATA_NS`: the agent that owns it (``owner``), the user id,
helper index, OS type, size, the memory ceiling, the DS id of the VM
(``vm_id``) and the VMM's identity (``vmm_id``, ``slam_host``,
``slam_port``), so the state of the agent can be rebuilt from libvirt.
"""

import dataclasses
import xml.etree.ElementTree as ET

METADATA_NS = 'http://rapid-vmm.org/xmlns/instance/1.0'
METADATA_PREFIX = 'rapid'

#: Integer fields of our metadata element, in order.
_INT_FIELDS = ('user_id', 'helper', 'os_type', 'vcpus', 'memory_mb',
               'disk_gb', 'gpu_cores', 'memory_max_mb', 'vm_id', 'vmm_id',
               'slam_port')
_STR_FIELDS = ('owner', 'image', 'disk', 'slam_host')
#: Fields of the VMM identity (``Instance.identity``).
IDENTITY_FIELDS = ('vmm_id', 'slam_host', 'slam_port')


class MetadataError(ValueError):
    """Our metadata element is there but cannot be read."""


@dataclasses.dataclass
class DomainSpec:
    """Everything the domain XML of one VM is made from."""

    name: str
    domain_type: str
    vcpus: int
    max_vcpus: int
    memory_mb: int
    max_memory_mb: int
    disk_path: str
    disk_format: str
    network: str
    metadata: dict
    kernel: str | None = None
    initrd: str | None = None
    kernel_cmdline: str = ''
    serial_log: str | None = None


def _sub(parent: ET.Element, tag: str, text: str | None = None,
         **attrib: str) -> ET.Element:
    element = ET.SubElement(parent, tag, {k: str(v) for k, v in
                                          attrib.items()})
    if text is not None:
        element.text = str(text)
    return element


def build_domain_xml(spec: DomainSpec) -> str:
    """Return the domain XML of ``spec``."""
    domain = ET.Element('domain', type=spec.domain_type)
    _sub(domain, 'name', spec.name)
    metadata = _sub(domain, 'metadata')
    metadata.append(build_metadata(spec.metadata))
    _sub(domain, 'memory', spec.max_memory_mb * 1024, unit='KiB')
    _sub(domain, 'currentMemory', spec.memory_mb * 1024, unit='KiB')
    _sub(domain, 'vcpu', spec.max_vcpus, placement='static',
         current=spec.vcpus)
    os_el = _sub(domain, 'os')
    if spec.domain_type == 'test':
        _sub(os_el, 'type', 'hvm')
    else:
        _sub(os_el, 'type', 'hvm', arch='x86_64', machine='pc')
    if spec.kernel:
        _sub(os_el, 'kernel', spec.kernel)
        if spec.initrd:
            _sub(os_el, 'initrd', spec.initrd)
        if spec.kernel_cmdline:
            _sub(os_el, 'cmdline', spec.kernel_cmdline)
    else:
        _sub(os_el, 'boot', dev='hd')
    if spec.domain_type != 'test':
        features = _sub(domain, 'features')
        _sub(features, 'acpi')
        _sub(features, 'apic')
    _sub(domain, 'on_poweroff', 'destroy')
    _sub(domain, 'on_reboot', 'restart')
    _sub(domain, 'on_crash', 'destroy')
    devices = _sub(domain, 'devices')
    disk = _sub(devices, 'disk', type='file', device='disk')
    _sub(disk, 'driver', name='qemu', type=spec.disk_format)
    _sub(disk, 'source', file=spec.disk_path)
    _sub(disk, 'target', dev='vda', bus='virtio')
    interface = _sub(devices, 'interface', type='network')
    _sub(interface, 'source', network=spec.network)
    _sub(interface, 'model', type='virtio')
    if spec.domain_type != 'test':
        if spec.serial_log:
            serial = _sub(devices, 'serial', type='file')
            _sub(serial, 'source', path=spec.serial_log, append='on')
        else:
            serial = _sub(devices, 'serial', type='pty')
        _sub(serial, 'target', port='0')
        memballoon = _sub(devices, 'memballoon', model='virtio')
        _sub(memballoon, 'stats', period='5')
        _sub(devices, 'rng', model='virtio').append(
            _backend_random())
    return ET.tostring(domain, encoding='unicode')


def _backend_random() -> ET.Element:
    backend = ET.Element('backend', model='random')
    backend.text = '/dev/urandom'
    return backend


def build_metadata(values: dict, namespace: str | None = METADATA_NS
                   ) -> ET.Element:
    """Return our ``<rapid:instance>`` element for ``values``.

    ``namespace`` None gives the bare element that
    ``virDomainSetMetadata`` wants (libvirt adds the namespace itself).
    """
    prefix = ''
    if namespace:
        ET.register_namespace(METADATA_PREFIX, namespace)
        prefix = f'{{{namespace}}}'
    root = ET.Element(f'{prefix}instance')
    for field in _STR_FIELDS + _INT_FIELDS:
        value = values.get(field)
        if value is not None:
            _sub(root, f'{prefix}{field}', value)
    return root


def metadata_xml(values: dict) -> str:
    """Our metadata element as a string, for ``virDomainSetMetadata``."""
    return ET.tostring(build_metadata(values, namespace=None),
                       encoding='unicode')


def read_metadata(xml: str) -> dict:
    """Parse our metadata element as libvirt returns it.

    ``virDomainGetMetadata`` returns the element without its namespace
    prefix; both forms are accepted.

    :raises MetadataError: when the element is malformed, has a field of
        the wrong type, or lacks the user id. (A missing ``owner`` is the
        caller's to judge.)
    """
    try:
        root = ET.fromstring(xml)  # noqa: S314 - libvirt's own XML
    except ET.ParseError as exc:
        raise MetadataError(f'not XML ({exc})') from None
    if _local(root.tag) != 'instance':
        raise MetadataError(f'unexpected element <{_local(root.tag)}>')
    values: dict = {}
    for child in root:
        field = _local(child.tag)
        text = (child.text or '').strip()
        if field in _INT_FIELDS:
            try:
                values[field] = int(text)
            except ValueError:
                raise MetadataError(f'{field} {text!r} is not an '
                                    f'integer') from None
        elif field in _STR_FIELDS:
            values[field] = text or None
    if values.get('user_id') is None:
        raise MetadataError('no user_id')
    return values


def parse_metadata(xml: str) -> dict | None:
    """:func:`read_metadata`, or None when it cannot be read."""
    try:
        return read_metadata(xml)
    except MetadataError:
        return None


def _local(tag: str) -> str:
    return tag.rsplit('}', 1)[-1]


def parse_domain_devices(xml: str) -> dict:
    """Return the disk path/target and NIC MAC addresses of a domain XML."""
    root = ET.fromstring(xml)  # noqa: S314 - libvirt's own XML
    result: dict = {'disks': [], 'macs': []}
    for disk in root.iterfind('./devices/disk'):
        source = disk.find('source')
        target = disk.find('target')
        result['disks'].append({
            'path': source.get('file') if source is not None else None,
            'target': target.get('dev') if target is not None else None,
        })
    for mac in root.iterfind('./devices/interface/mac'):
        if mac.get('address'):
            result['macs'].append(mac.get('address').lower())
    return result


def domain_disk_files(xml: str) -> set[str]:
    """Every file a domain XML uses as a disk: each ``<disk>``'s source
    and the files of its ``<backingStore>`` chain."""
    root = ET.fromstring(xml)  # noqa: S314 - libvirt's own XML
    files = set()
    for disk in root.iterfind('./devices/disk'):
        for source in disk.iter('source'):
            path = source.get('file')
            if path:
                files.add(path)
    return files
