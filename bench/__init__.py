"""
notifyd's benchmark: ``python -m bench`` (see ``bench/__main__.py``).

Everything runs on this machine and talks only to 127.0.0.1.
"""
