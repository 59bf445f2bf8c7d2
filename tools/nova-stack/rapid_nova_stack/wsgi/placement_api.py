"""gunicorn target: placement's API (``...placement_api:application``)."""
import sys

sys.argv = ['placement-api']

from placement.wsgi.api import application  # noqa: E402,F401
