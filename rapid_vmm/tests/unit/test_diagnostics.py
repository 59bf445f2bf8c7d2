"""Tests of rapid_vmm.diagnostics: the agent's Guru Meditation section and
the whole oslo.reports report with it."""

import os
import threading

from oslo_config import cfg
from oslo_reports import guru_meditation_report as gmr
import pytest

from rapid_vmm import conf as rapid_conf
from rapid_vmm import diagnostics
from rapid_vmm import exception


@pytest.fixture(autouse=True)
def no_source():
    diagnostics.set_source(None)
    yield
    diagnostics.set_source(None)


def section_text(timeout=diagnostics.SOURCE_TIMEOUT) -> str:
    model = diagnostics.AgentSection(timeout)()
    model.set_current_view_type('text')
    return str(model)


def agent_state():
    return {'host': 'compute-7', 'identity': {'vmm_id': 5},
            'driver': {'name': 'libvirt', 'reachable': False},
            'outbox': {'depth': 3},
            'vms': [{'user_id': 7, 'name': 'rapid-vm-7-abc',
                     'task_state': 'building', 'ip_address': None},
                    {'user_id': -1, 'name': 'rapid-helper-1-x',
                     'task_state': '(none)'}]}


def test_section_of_a_process_that_does_not_serve():
    data = diagnostics.collect()
    assert data['serving'] is False
    assert str(os.getpid()) in data['note']


def test_section_shows_vms_task_states_outbox_and_driver():
    diagnostics.set_source(agent_state)
    text = section_text()
    assert 'host = compute-7' in text
    assert 'reachable = False' in text
    assert 'depth = 3' in text
    assert 'vmm_id = 5' in text
    assert 'user 7:' in text and 'user -1:' in text
    assert 'task_state = building' in text
    assert 'name = rapid-helper-1-x' in text
    assert 'ip_address = -' in text


def test_section_never_hangs_nor_raises():
    release = threading.Event()
    diagnostics.set_source(release.wait)
    assert 'did not answer in 0.2 s' in section_text(0.2)
    release.set()

    def broken():
        raise exception.DriverError(action='list', reason='gone')

    diagnostics.set_source(broken)
    assert 'DriverError' in section_text()


def test_whole_report_masks_secrets(tmp_path):
    conf = rapid_conf.CONF
    secret = 'rabbit://ops:TopSecret-42@broker:5672/'
    conf.set_override('transport_url', secret, group='client')
    diagnostics.set_source(agent_state)
    try:
        if not diagnostics._registered(gmr.TextGuruMeditation):
            gmr.TextGuruMeditation.register_section(
                diagnostics.SECTION, diagnostics.AgentSection())
        report = gmr.TextGuruMeditation(diagnostics.VersionInfo()).run()
    finally:
        conf.clear_override('transport_url', group='client')
    assert 'TopSecret-42' not in report
    assert 'transport_url = ***' in report
    for title in ('Package', 'Threads', 'Configuration',
                  diagnostics.SECTION):
        assert title in report, title
    assert 'rapid-vm-7-abc' in report
    # The stack of this very thread is in it.
    assert 'test_whole_report_masks_secrets' in report


def test_report_file_in_log_dir(tmp_path):
    diagnostics.set_source(agent_state)
    gmr.TextGuruMeditation.handle_signal(
        diagnostics.VersionInfo(), diagnostics.SERVICE_NAME, str(tmp_path),
        None)
    [name] = os.listdir(tmp_path)
    assert name.startswith('rapid-vmm_gurumeditation_')


def test_bad_file_event_handler_is_a_configuration_error(tmp_path):
    conf = cfg.ConfigOpts()
    conf([], default_config_files=[], default_config_dirs=[])
    diagnostics.register_opts(conf)
    diagnostics.validate(conf)
    conf.set_override('file_event_handler', str(tmp_path / 'absent'),
                      group='oslo_reports')
    with pytest.raises(exception.ConfigError, match='file_event_handler'):
        diagnostics.validate(conf)
