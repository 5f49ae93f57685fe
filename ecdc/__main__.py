"""``python -m ecdc`` runs the command line."""
from .cli import main

main()
