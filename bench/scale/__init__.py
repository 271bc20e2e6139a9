"""
``python -m bench scale``: many sessions on one instance, and more
instances on one database (``run.py`` says what it measures).
"""
