"""``python -m services.dataset``: run the dataset service with settings from the environment."""

from libs.service import main
from services.dataset.app import SERVICE_NAME, run

if __name__ == "__main__":
    # uvloop: a burst of applies is thousands of small NATS round trips (docs/benchmarks.md, Load).
    main(SERVICE_NAME, run, fast_loop=True)
