"""python -m jaxedit: the jaxedit command (jaxedit.cli)."""
import sys

from jaxedit.cli import main

sys.exit(main())
