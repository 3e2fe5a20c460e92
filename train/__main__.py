import sys

# Absolute import: paddle.distributed.launch runs this file as a script (see train/distributed.py).
from train.cli import main

sys.exit(main())
