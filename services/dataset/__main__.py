"""``python -m services.dataset``: run the dataset service with settings from the environment."""

from libs.service import main
from services.dataset.app import SERVICE_NAME, run

if __name__ == "__main__":
    main(SERVICE_NAME, run)
