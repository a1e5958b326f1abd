"""`python -m moecompress ...` (and `torchrun ... -m moecompress quantize ...`): the command line."""
import sys

from moecompress.cli import main

sys.exit(main())
