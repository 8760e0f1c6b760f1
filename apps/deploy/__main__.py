"""Entry point of the packaged app (``monai-deploy package`` runs ``python3 <app folder>``)."""

import sys

from app import main

sys.exit(main())
