"""The codec of the original protocol against the streams real Java made.

Every vector of ``legacy-vectors/`` is decoded and encoded again byte for
byte; the limits, the records that are refused, and fuzzed frames (only
:class:`codec.CodecError` may come out) are checked too.
"""

import os
import socket
import threading
import time

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import pytest

from rapid_vmm.legacy import codec

VECTORS = os.environ.get('RAPID_VMM_LEGACY_VECTORS',
                         '/work/shared/legacy-vectors')
HERE = os.path.dirname(os.path.abspath(__file__))

#: Each vector: its layout and the values the README gives.
LAYOUTS = {
    'slam_start_vm_request': (['byte', 'long', 'int', 'int', 'int', 'int'],
                              [60, 7, 0, 2, 2048, 0]),
    'slam_start_vm_reply_ok': (['byte', 'long', 'utf'],
                               [1, 7, '192.168.122.23']),
    'slam_start_vm_reply_error': (['byte'], [0]),
    'slam_get_vminfo_request_all': (['byte', 'long'], [63, 0]),
    'slam_get_vminfo_reply': (['byte', 'list'], [1, [
        '7', '1001', '2', '2048', '20', '0',
        '8', '1002', '1', '1024', '20', '0']]),
    'slam_get_vmcpu_request': (['byte', 'long'], [62, 7]),
    'slam_get_vmcpu_reply': (['byte', 'list'], [1, ['7', '1001', '12.5']]),
    'slam_get_vmmem_request': (['byte', 'long'], [66, 0]),
    'slam_get_vmmem_reply': (['byte', 'list'],
                             [1, ['7', '1001', '2048', '1536.0']]),
    'slam_get_vmdisk_request': (['byte', 'long'], [67, 7]),
    'slam_get_vmdisk_reply': (['byte', 'list'], [1, [
        '7', '1001', '21474836480', '1073741824.0']]),
    'slam_change_vmflv_request': (['byte', 'long', 'int', 'int', 'int'],
                                  [64, 7, 4, 0, 0]),
    'slam_confirm_vmflv_request': (['byte', 'long'], [65, 7]),
    'reply_ok': (['byte'], [1]),
    'reply_empty_list': (['byte', 'list'], [1, []]),
    'vmm_register_slam_request': (['byte', 'utf', 'int'],
                                  [61, '10.0.0.5', 9000]),
    'vmm_register_ds_request': (
        ['byte', 'utf', 'int', 'int', 'int', 'long', 'int', 'int', 'utf'],
        [70, '10.0.0.5', 4, 13, 16, 12000, 0, 3072, '1000000000']),
    'vmm_register_ds_reply': (['byte', 'long', 'utf', 'int'],
                              [1, 4242, '10.0.0.9', 9002]),
    'vmm_notify_ds': (['byte', 'long', 'int', 'long', 'int'],
                      [71, 4242, 13, 12000, 0]),
    'vm_register_ds_request': (['byte', 'long', 'int', 'int', 'long',
                                'int'], [72, 4242, 0, 0, 7, 1]),
    'vm_register_ds_reply': (['long'], [1001]),
    'vm_notify_ds': (['byte', 'long', 'int'], [73, 1001, 2]),
    'helper_notify_ds': (['byte', 'long', 'utf'],
                         [74, 1000, '192.168.122.30']),
    'ds_vm_deregister_vmm': (['byte', 'long'], [75, 7]),
    'as_rm_register_vmm_request': (['byte', 'utf'],
                                   [38, '192.168.122.23']),
    'as_rm_register_vmm_reply': (['byte', 'long'], [1, 7]),
    'as_rm_register_vmm_status': (['byte'], [1]),
    'as_rm_notify_vmm_suspend': (['byte', 'long', 'int'], [39, 7, 1]),
    'as_rm_notify_vmm_remove': (['byte', 'long', 'int'], [39, 7, 2]),
    'vmm_migration_as_request': (['raw', 'long'], [57, 7]),
    'long_utf_ip': (['byte', 'utf'], [38, 'x' * 2000]),
}

#: Vectors that are requests of :data:`codec.REQUESTS`.
REQUEST_VECTORS = {
    'slam_start_vm_request': dict(user_id=7, os_type=0, vcpus=2,
                                  memory_mb=2048, gpu_cores=0),
    'slam_get_vminfo_request_all': dict(user_id=0),
    'slam_get_vmcpu_request': dict(user_id=7),
    'slam_get_vmmem_request': dict(user_id=0),
    'slam_get_vmdisk_request': dict(user_id=7),
    'slam_change_vmflv_request': dict(user_id=7, vcpus=4, memory_mb=0,
                                      disk_gb=0),
    'slam_confirm_vmflv_request': dict(user_id=7),
    'vmm_register_slam_request': dict(ip_address='10.0.0.5', port=9000),
    'vmm_register_ds_request': dict(
        ip_address='10.0.0.5', mac_type=4, cpu_load=13, cpu_count=16,
        free_memory_mb=12000, gpu_load=0, gpu_cores=3072,
        available_types='1000000000'),
    'vmm_notify_ds': dict(vmm_id=4242, cpu_load=13, free_memory_mb=12000,
                          gpu_load=0),
    'vm_register_ds_request': dict(vmm_id=4242, category=0, vm_type=0,
                                   user_id=7, status=1),
    'vm_notify_ds': dict(vm_id=1001, status=2),
    'helper_notify_ds': dict(vm_id=1000, ip_address='192.168.122.30'),
    'ds_vm_deregister_vmm': dict(user_id=7),
    'as_rm_register_vmm_request': dict(ip_address='192.168.122.23'),
    'as_rm_notify_vmm_suspend': dict(user_id=7, type=1),
    'as_rm_notify_vmm_remove': dict(user_id=7, type=2),
}


def vector(name: str) -> bytes:
    with open(os.path.join(VECTORS, name + '.bin'), 'rb') as source:
        return source.read()


def vector_names() -> list[str]:
    return sorted(n[:-4] for n in os.listdir(VECTORS) if n.endswith('.bin'))


needs_vectors = pytest.mark.skipif(not os.path.isdir(VECTORS),
                                   reason='no legacy-vectors directory')


@needs_vectors
def test_every_vector_has_a_layout():
    assert set(vector_names()) == set(LAYOUTS)


@needs_vectors
@pytest.mark.parametrize('name', sorted(LAYOUTS))
def test_vector_decodes_to_its_values(name):
    layout, values = LAYOUTS[name]
    assert codec.decode(vector(name), layout) == values


@needs_vectors
@pytest.mark.parametrize('name', sorted(LAYOUTS))
def test_values_encode_to_the_vector_byte_for_byte(name):
    layout, values = LAYOUTS[name]
    assert codec.encode(layout, values) == vector(name)


@needs_vectors
@pytest.mark.parametrize('name', sorted(REQUEST_VECTORS))
def test_requests_encode_and_read_as_the_vectors(name):
    data = vector(name)
    command = data[6]
    assert codec.encode_request(command, **REQUEST_VECTORS[name]) == data
    reader = codec.Reader(codec.BufferSource(data))
    assert codec.read_request(reader) == (command, REQUEST_VECTORS[name])
    assert reader.at_end()


@needs_vectors
def test_the_list_repeats_strings_as_back_references():
    # "20" and "0" of the second VM are TC_REFERENCEs to handles 6 and 7.
    data = vector('slam_get_vminfo_reply')
    assert data.endswith(b'q\x00~\x00\x06q\x00~\x00\x07x')


@needs_vectors
def test_the_as_notice_command_byte_is_outside_any_block():
    data = vector('vmm_migration_as_request')
    assert data[4] == codec.DS_MIGRATION_VM_AS
    reader = codec.Reader(codec.BufferSource(data))
    reader.read_header()
    with pytest.raises(codec.CodecError):
        reader.read_byte()  # 0x39 is no block header


@needs_vectors
def test_long_string_spans_two_long_blocks():
    data = vector('long_utf_ip')
    assert data[4] == codec.TC_BLOCKDATALONG
    assert int.from_bytes(data[5:9], 'big') == codec.MAX_BLOCK


def test_primitives_across_block_boundaries_read_as_one_stream():
    # A sender may flush between fields: Java reads the same values.
    one = codec.encode(['byte', 'long', 'utf'], [38, 7, 'a'])
    split = (codec.HEADER + b'\x77\x01\x26' + b'\x77\x03\x00\x00\x00'
             + b'\x7a\x00\x00\x00\x05\x00\x00\x00\x00\x07'
             + b'\x77\x03\x00\x01a')
    assert codec.decode(one, ['byte', 'long', 'utf']) == \
        codec.decode(split, ['byte', 'long', 'utf'])


def test_two_lists_in_one_stream_share_the_class_descriptor():
    data = codec.encode(['list', 'list'], [['a', 'b'], ['b', 'c']])
    assert data.count(b'java.util.ArrayList') == 1
    assert codec.decode(data, ['list', 'list']) == [['a', 'b'], ['b', 'c']]


def test_modified_utf8_of_nul_and_supplementary_characters():
    text = 'a\x00\u00e9\u20ac\U0001F600'
    data = codec.encode_mutf8(text)
    assert b'\x00' not in data
    assert data.startswith(b'a\xc0\x80')
    # A supplementary character is two 3-byte surrogates, not 4 bytes.
    assert data.endswith(b'\xed\xa0\xbd\xed\xb8\x80')
    assert codec.decode_mutf8(data) == text


@pytest.mark.parametrize('data', [b'\x80', b'\xc3', b'\xe2\x82', b'\xf0\x9f',
                                  b'\xc3\x28', b'\xe2\x28\xa1'])
def test_malformed_modified_utf8_is_a_codec_error(data):
    with pytest.raises(codec.CodecError):
        codec.decode_mutf8(data)


# -- refusals and limits ---------------------------------------------------

def reads(data, layout, limits=codec.DEFAULT_LIMITS):
    return codec.decode(data, layout, limits)


@needs_vectors
def test_object_of_another_class_is_refused():
    data = vector('reply_empty_list').replace(b'java.util.ArrayList',
                                              b'java.util.HashMaps.')
    with pytest.raises(codec.CodecError, match='HashMaps'):
        reads(data, ['byte', 'list'])


def test_list_of_another_item_class_is_refused():
    # An Integer (a TC_OBJECT) where a String is expected.
    integer = (b'\x73\x72\x00\x11java.lang.Integer\x12\xe2\xa0\xa4\xf7'
               b'\x81\x87\x38\x02\x00\x01I\x00\x05valuexp\x00\x00\x00\x07')
    data = codec.encode(['byte', 'list'], [1, ['a']])
    assert data.endswith(b'\x74\x00\x01a\x78')
    data = data[:-5] + integer + b'\x78'
    with pytest.raises(codec.CodecError, match='only strings'):
        reads(data, ['byte', 'list'])


@pytest.mark.parametrize('data', [
    b'\xac\xed\x00\x04\x77\x01\x01',           # stream version
    b'\xca\xfe\xba\xbe\x77\x01\x01',           # not a stream
    codec.HEADER + b'\x79',                    # TC_RESET
    codec.HEADER + b'\x7b',                    # TC_EXCEPTION
    codec.HEADER + b'\x73\x7d',                # a proxy class
    codec.HEADER + b'\x7a\xff\xff\xff\xff',    # negative block length
    codec.HEADER + b'\x77\x01\x01\x71\x00\x7e\x00\x09',  # dangling handle
])
def test_records_that_are_not_read(data):
    with pytest.raises(codec.CodecError):
        reads(data, ['byte', 'list'])


def test_truncated_frames_are_truncated_errors():
    data = codec.encode(['byte', 'long', 'utf', 'list'],
                        [60, 7, 'abc', ['x', 'y', 'x']])
    for cut in range(len(data)):
        with pytest.raises(codec.Truncated):
            reads(data[:cut], ['byte', 'long', 'utf', 'list'])


def test_trailing_data_is_refused_by_decode():
    with pytest.raises(codec.CodecError, match='after the end'):
        reads(codec.encode(['byte'], [1]) + b'\x00', ['byte'])


def test_frame_string_list_and_block_limits():
    small = codec.Limits(max_frame_bytes=128, max_string_bytes=8,
                         max_list_items=2)
    with pytest.raises(codec.FrameTooLarge, match='at most 128'):
        reads(codec.encode(['utf'], ['x' * 200]), ['utf'], small)
    with pytest.raises(codec.FrameTooLarge, match='string'):
        reads(codec.encode(['utf'], ['x' * 9]), ['utf'], small)
    with pytest.raises(codec.FrameTooLarge, match='list of 3'):
        reads(codec.encode(['list'], [['a', 'b', 'c']]), ['list'], small)
    with pytest.raises(codec.FrameTooLarge, match='block'):
        reads(codec.HEADER + b'\x7a\x00\x01\x00\x00', ['byte'], small)
    assert reads(codec.encode(['list'], [['a', 'b']]), ['list'],
                 small) == [['a', 'b']]


def test_unknown_command_is_a_codec_error():
    reader = codec.Reader(codec.BufferSource(codec.encode(['byte'], [99])))
    with pytest.raises(codec.UnknownCommand):
        codec.read_request(reader)


def test_writer_refuses_values_out_of_range():
    with pytest.raises(ValueError):
        codec.Writer().write_int(2 ** 31)
    with pytest.raises(TypeError):
        codec.Writer().write_long('7')
    with pytest.raises(TypeError):
        codec.Writer().write_string_list([7])


# -- the socket source: deadline and budget --------------------------------

def test_socket_source_gives_up_at_its_deadline():
    left, right = socket.socketpair()
    with left, right:
        right.sendall(codec.HEADER + b'\x77\x09\x3f')  # 2 of 10 bytes
        reader = codec.Reader(codec.SocketSource(left,
                                                 time.monotonic() + 0.3))
        started = time.monotonic()
        with pytest.raises(codec.ReadTimeout):
            reader.read_header()
            reader.read_byte()
            reader.read_long()
        assert time.monotonic() - started < 2


def test_socket_source_reads_a_frame_sent_byte_by_byte():
    data = codec.encode(['byte', 'utf'], [38, '192.168.122.23'])
    left, right = socket.socketpair()

    def trickle():
        for index in range(len(data)):
            right.send(data[index:index + 1])
            time.sleep(0.002)

    with left, right:
        thread = threading.Thread(target=trickle)
        thread.start()
        reader = codec.Reader(codec.SocketSource(left,
                                                 time.monotonic() + 10))
        reader.read_header()
        assert [reader.read_byte(), reader.read_utf()] == [
            38, '192.168.122.23']
        thread.join()


def test_socket_source_budget():
    left, right = socket.socketpair()
    with left, right:
        right.sendall(codec.encode(['utf'], ['x' * 200]))
        reader = codec.Reader(codec.SocketSource(
            left, time.monotonic() + 5, codec.Limits(max_frame_bytes=100)))
        reader.read_header()
        with pytest.raises(codec.FrameTooLarge):
            reader.read_utf()


# -- fuzzing ---------------------------------------------------------------

KIND_VALUES = {
    'byte': st.integers(-128, 127),
    'int': st.integers(codec.INT_MIN, codec.INT_MAX),
    'long': st.integers(codec.LONG_MIN, codec.LONG_MAX),
    'utf': st.text(max_size=300),
    'list': st.lists(st.text(max_size=20), max_size=30),
    'raw': st.integers(-128, 127),
}

frames = st.lists(st.sampled_from(sorted(KIND_VALUES)), max_size=12).flatmap(
    lambda layout: st.tuples(st.just(layout), st.tuples(
        *[KIND_VALUES[kind] for kind in layout])))


@settings(max_examples=300, deadline=None)
@given(frames)
def test_any_frame_round_trips(frame):
    layout, values = frame
    # A raw byte right after primitives is legal on the wire (a block is
    # drained first); reading it back needs the block boundary, which
    # encode() gives: round-trip holds for every layout.
    data = codec.encode(layout, list(values))
    assert codec.decode(data, layout) == list(values)


def _mutations():
    seeds = [codec.encode(layout, values) for layout, values in
             (LAYOUTS[n] for n in sorted(LAYOUTS))] if os.path.isdir(
        VECTORS) else [codec.encode(['byte', 'list'], [1, ['a', 'b', 'a']])]
    return st.tuples(st.sampled_from(seeds),
                     st.lists(st.tuples(st.integers(0, 4096),
                                        st.integers(0, 255)), max_size=6),
                     st.integers(0, 4096))


@settings(max_examples=1500, deadline=None)
@given(_mutations(), st.sampled_from(sorted(LAYOUTS)))
def test_mutated_frames_raise_only_codec_errors(mutation, layout_name):
    seed, flips, cut = mutation
    data = bytearray(seed)
    for position, value in flips:
        if data:
            data[position % len(data)] = value
    data = bytes(data[:cut])
    layout = LAYOUTS[layout_name][0]
    try:
        codec.decode(data, layout)
    except codec.CodecError:
        pass
    try:
        codec.read_request(codec.Reader(codec.BufferSource(data)))
    except codec.CodecError:
        pass


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=512), st.lists(st.sampled_from(sorted(KIND_VALUES)),
                                         max_size=6))
def test_random_bytes_raise_only_codec_errors(data, layout):
    for candidate in (data, codec.HEADER + data):
        try:
            codec.decode(candidate, layout)
        except codec.CodecError:
            pass


@needs_vectors
@pytest.mark.parametrize('name', sorted(REQUEST_VECTORS))
def test_simple_request_reader_agrees_with_the_reader(name):
    data = vector(name)
    simple = codec.read_simple_request(data)
    reader = codec.Reader(codec.BufferSource(data))
    full = codec.read_request(reader)
    if 'utf' in [kind for _n, kind in codec.REQUESTS[full[0]]]:
        assert simple is None
    else:
        assert simple == full


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=40), st.sampled_from(sorted(REQUEST_VECTORS)))
def test_simple_request_reader_never_disagrees(noise, name):
    try:
        seed = vector(name)
    except OSError:
        return
    for data in (seed[:7] + noise, seed + noise, noise, seed[:-1]):
        simple = codec.read_simple_request(data)
        if simple is None:
            continue
        assert simple == codec.read_request(
            codec.Reader(codec.BufferSource(data)))
