"""`python -m services.monitor --pipeline-spec PATH`."""

from .app import main

main()
