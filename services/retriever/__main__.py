"""`python -m services.retriever --pipeline-spec PATH`."""

from services.retriever.app import main

main()
