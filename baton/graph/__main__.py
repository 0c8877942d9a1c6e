import sys

from baton.graph.supervisor import main

sys.exit(main())
