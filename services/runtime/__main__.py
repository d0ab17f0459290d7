"""``python -m services.runtime``: run the runtime service with settings from the environment."""

from libs.service import main
from services.runtime.app import SERVICE_NAME, run

if __name__ == "__main__":
    main(SERVICE_NAME, run)
