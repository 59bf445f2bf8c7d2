"""Glue for the rapid-vmm test Nova stack on 127.0.0.1.

Nothing here is meant for production: it replaces Keystone by trusting the
token text, and it binds every Neutron port without any agent.
"""
