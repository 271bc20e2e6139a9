"""
What only the ``notifyd demo`` command, the test suite and the benchmark use:
a throwaway PostgreSQL cluster run from the binaries of the ``pgserver`` wheel
(the ``notifyd[embedded]`` extra). The daemon never imports this package.
"""
