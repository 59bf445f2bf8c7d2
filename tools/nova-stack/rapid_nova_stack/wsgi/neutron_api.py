"""gunicorn target: neutron's API (``...neutron_api:application``)."""
import sys

sys.argv = ['neutron-api']

from neutron.wsgi.api import application  # noqa: E402,F401
