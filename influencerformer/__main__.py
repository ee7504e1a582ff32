"""``python -m influencerformer ...`` (and ``torchrun -m influencerformer train ...``)."""
import sys

from influencerformer.cli import main

if __name__ == "__main__":
    sys.exit(main())
