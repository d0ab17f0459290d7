"""``python -m services.scheduler``: run the scheduler service with settings from the environment."""

from libs.service import main
from services.scheduler.app import SERVICE_NAME, run

if __name__ == "__main__":
    main(SERVICE_NAME, run)
