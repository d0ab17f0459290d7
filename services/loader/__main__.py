"""``python -m services.loader``: run the loader service with settings from the environment."""

from libs.service import main
from services.loader.app import SERVICE_NAME, run

if __name__ == "__main__":
    main(SERVICE_NAME, run)
