import sys

from dataplane.main import main

sys.exit(main())
